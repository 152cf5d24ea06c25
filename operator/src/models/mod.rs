//! Model endpoints behind one [`ModelClient`] trait, routed by the tier's endpoint kind:
//!
//! - `builtin`: deterministic local models for development and tests ([`Builtin`]);
//! - `openai`: OpenAI-compatible chat completions ([`openai`]);
//! - `anthropic`: Anthropic Messages ([`anthropic`]).
//!
//! Remote tiers need a `secretRef`; [`Models`] reads the API key from its [`SecretSource`] for each
//! call (sources cache as they see fit) and never puts it in a log line or an error. Errors say whether
//! a retry can help: [`ModelError::Failed`] (network, timeout, 408/409/429/5xx, unreadable reply) goes
//! back to the queue, [`ModelError::Rejected`] (400/401/403/404, missing secret, bad endpoint) fails
//! the task at once.

pub mod anthropic;
mod builtin;
mod http;
pub mod openai;
pub mod plan;

use std::sync::Arc;

use agentplane_api::policy::{EndpointKind, ModelTier};
use async_trait::async_trait;

pub use builtin::Builtin;
pub use http::{HttpOptions, HttpSetupError};

use crate::secrets::SecretSource;

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
    /// The endpoint (or the runtime, before calling it) refused the call for a reason a retry cannot
    /// fix: bad request, bad or missing credentials, unknown model, endpoint not allowed.
    #[error("model call rejected: {0}")]
    Rejected(String),
}

impl ModelError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ModelError::Failed(_))
    }
}

/// One model call: what to ask, where, and the keys that make it traceable and safe to repeat.
#[derive(Clone, Copy, Debug)]
pub struct ModelCall<'a> {
    pub tier: &'a ModelTier,
    pub prompt: &'a str,
    pub params: &'a serde_json::Map<String, serde_json::Value>,
    /// Sent as `Idempotency-Key`; the same for every attempt at the same step of the same task
    /// (see [`idempotency_key`]), so an endpoint that honours it runs a redelivered call once.
    pub idempotency_key: &'a str,
    /// The W3C `traceparent` of the task's trace, forwarded when well formed.
    pub traceparent: Option<&'a str>,
}

impl ModelCall<'_> {
    /// The model name sent to the endpoint: the tier's `model`, else the tier's name.
    pub fn model(&self) -> &str {
        self.tier.model.as_deref().unwrap_or(&self.tier.name)
    }
}

/// The idempotency key of step `step` of task `task_id` (DESIGN.md §2: derived from task id + step).
pub fn idempotency_key(task_id: &str, step: u32) -> String {
    format!("{task_id}/model/{step}")
}

/// The idempotency key of tool step `step` of task `task_id`, sent to the MCP server in the call's
/// `_meta` so a server can apply a re-run of a step journaled as started (but not finished) once.
pub fn tool_idempotency_key(task_id: &str, step: u32) -> String {
    format!("{task_id}/tool/{step}")
}

#[async_trait]
pub trait ModelClient: Send + Sync {
    async fn complete(&self, call: &ModelCall<'_>) -> Result<Completion, ModelError>;

    /// One turn of a plan: the conversation so far and the tools the policy allows. A client that
    /// cannot call tools answers with its plain completion of the prompt (a one-turn plan).
    async fn turn(
        &self,
        call: &ModelCall<'_>,
        _conversation: &plan::Conversation,
        _tools: &[plan::ToolSpec],
    ) -> Result<plan::TurnReply, ModelError> {
        let c = self.complete(call).await?;
        Ok(plan::TurnReply {
            turn: plan::Turn::Answer { text: c.text },
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
        })
    }
}

/// Routes a tier to its client by endpoint kind.
///
/// `Models::default()` serves builtin tiers only (remote tiers are rejected with a reason);
/// [`Models::new`] adds the remote clients and the secret source their keys come from.
#[derive(Default)]
pub struct Models {
    builtin: Builtin,
    remote: Option<Remote>,
}

struct Remote {
    http: http::Http,
    secrets: Arc<dyn SecretSource>,
}

impl Models {
    /// Builtin and remote models, with default HTTP timeouts and limits.
    pub fn new(secrets: Arc<dyn SecretSource>) -> Result<Models, HttpSetupError> {
        Models::with_options(secrets, &HttpOptions::default())
    }

    pub fn with_options(
        secrets: Arc<dyn SecretSource>,
        options: &HttpOptions,
    ) -> Result<Models, HttpSetupError> {
        Ok(Models {
            builtin: Builtin,
            remote: Some(Remote {
                http: http::Http::new(options)?,
                secrets,
            }),
        })
    }
}

impl Models {
    /// The remote client and the API key of `tier`, or why the call cannot be made.
    async fn remote_key<'a>(
        &'a self,
        tier: &ModelTier,
    ) -> Result<(&'a Remote, crate::secrets::SecretValue), ModelError> {
        let Some(remote) = &self.remote else {
            return Err(ModelError::Rejected(format!(
                "tier {} calls a remote endpoint, but this runtime was started without a secret source for model keys",
                tier.name
            )));
        };
        let Some(secret_ref) = &tier.secret_ref else {
            return Err(ModelError::Rejected(format!(
                "tier {} needs secretRef (the Secret holding its API key)",
                tier.name
            )));
        };
        let key = remote.secrets.get(secret_ref).await.map_err(|e| {
            let message = format!("reading the API key of tier {}: {e}", tier.name);
            if e.is_transient() {
                ModelError::Failed(message)
            } else {
                ModelError::Rejected(message)
            }
        })?;
        Ok((remote, key))
    }

    /// After a rejected call: possibly a revoked or rotated key, so the next task reads it afresh.
    fn forget_key_if_rejected<T>(&self, tier: &ModelTier, result: &Result<T, ModelError>) {
        if let (Err(ModelError::Rejected(_)), Some(remote), Some(secret_ref)) =
            (result, &self.remote, &tier.secret_ref)
        {
            remote.secrets.invalidate(secret_ref);
        }
    }
}

#[async_trait]
impl ModelClient for Models {
    async fn complete(&self, call: &ModelCall<'_>) -> Result<Completion, ModelError> {
        let tier = call.tier;
        if tier.endpoint_kind == EndpointKind::Builtin {
            return self.builtin.complete(call).await;
        }
        let (remote, key) = self.remote_key(tier).await?;
        let result = match tier.endpoint_kind {
            EndpointKind::Openai => openai::complete(&remote.http, call, &key).await,
            EndpointKind::Anthropic => anthropic::complete(&remote.http, call, &key).await,
            EndpointKind::Builtin => self.builtin.complete(call).await,
        };
        self.forget_key_if_rejected(tier, &result);
        result
    }

    async fn turn(
        &self,
        call: &ModelCall<'_>,
        conversation: &plan::Conversation,
        tools: &[plan::ToolSpec],
    ) -> Result<plan::TurnReply, ModelError> {
        let tier = call.tier;
        if tier.endpoint_kind == EndpointKind::Builtin {
            return self.builtin.turn(call, conversation, tools).await;
        }
        let (remote, key) = self.remote_key(tier).await?;
        let result = match tier.endpoint_kind {
            EndpointKind::Openai => {
                openai::complete_turn(&remote.http, call, &key, conversation, tools).await
            }
            EndpointKind::Anthropic => {
                anthropic::complete_turn(&remote.http, call, &key, conversation, tools).await
            }
            EndpointKind::Builtin => self.builtin.turn(call, conversation, tools).await,
        };
        self.forget_key_if_rejected(tier, &result);
        result
    }
}

/// A turn that asked for tools, with the reported usage or (when the endpoint left it out) the same
/// word-count estimate as [`usage_or_estimate`].
pub(crate) fn tool_calls_turn(
    call: &ModelCall<'_>,
    text: Option<String>,
    calls: Vec<plan::ToolCall>,
    (input, output): (Option<u64>, Option<u64>),
) -> plan::TurnReply {
    let estimated_output = text.as_deref().map(count_tokens).unwrap_or(1);
    plan::TurnReply {
        turn: plan::Turn::ToolCalls { text, calls },
        input_tokens: input.unwrap_or_else(|| count_tokens(call.prompt)),
        output_tokens: output.unwrap_or(estimated_output),
    }
}

/// Tokens as whitespace-separated words, at least one (the builtin models' measure, and the estimate
/// for endpoints that report no usage).
pub fn count_tokens(text: &str) -> u64 {
    (text.split_whitespace().count() as u64).max(1)
}

/// The reported usage, or an estimate when the endpoint left it out (some OpenAI-compatible servers
/// do): a completion already paid for is worth more than exact counts.
fn usage_or_estimate(
    provider: &str,
    call: &ModelCall<'_>,
    text: String,
    (input, output): (Option<u64>, Option<u64>),
) -> Completion {
    if input.is_none() || output.is_none() {
        tracing::warn!(
            tier = %call.tier.name,
            provider,
            "the endpoint reported no token usage; estimating it from word counts"
        );
    }
    Completion {
        input_tokens: input.unwrap_or_else(|| count_tokens(call.prompt)),
        output_tokens: output.unwrap_or_else(|| count_tokens(&text)),
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::FileSecrets;
    use agentplane_api::policy::SecretKeyRef;
    use serde_json::json;

    fn tier(kind: EndpointKind, endpoint: &str) -> ModelTier {
        ModelTier {
            name: "t".into(),
            endpoint_kind: kind,
            endpoint: endpoint.into(),
            model: None,
            price_per_1k_input_micros: 0,
            price_per_1k_output_micros: 0,
            privacy_levels: vec![],
            gpu: false,
            secret_ref: None,
        }
    }

    fn call<'a>(
        tier: &'a ModelTier,
        prompt: &'a str,
        params: &'a serde_json::Map<String, serde_json::Value>,
    ) -> ModelCall<'a> {
        ModelCall {
            tier,
            prompt,
            params,
            idempotency_key: "task-1/model/1",
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn builtin_models_are_deterministic() {
        let m = Models::default();
        let none = serde_json::Map::new();
        let echo = tier(EndpointKind::Builtin, "builtin:echo");
        let a = m
            .complete(&call(&echo, "hello world", &none))
            .await
            .unwrap();
        let b = m
            .complete(&call(&echo, "hello world", &none))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.text, "echo: hello world");
        assert_eq!((a.input_tokens, a.output_tokens), (2, 3));
        let rev = tier(EndpointKind::Builtin, "builtin:reverse");
        let r = m.complete(&call(&rev, "abc", &none)).await.unwrap();
        assert_eq!(r.text, "cba");
        let fail = tier(EndpointKind::Builtin, "builtin:fail");
        assert!(matches!(
            m.complete(&call(&fail, "x", &none)).await,
            Err(ModelError::Failed(_))
        ));
        let nope = tier(EndpointKind::Builtin, "builtin:nope");
        assert!(matches!(
            m.complete(&call(&nope, "x", &none)).await,
            Err(ModelError::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn remote_tiers_need_a_secret_source_and_a_secret_ref() {
        let none = serde_json::Map::new();
        let openai = tier(EndpointKind::Openai, "https://api.openai.com/v1");
        let e = Models::default()
            .complete(&call(&openai, "x", &none))
            .await
            .unwrap_err();
        assert!(matches!(e, ModelError::Rejected(_)), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let m = Models::new(Arc::new(FileSecrets::new(dir.path()))).unwrap();
        let e = m.complete(&call(&openai, "x", &none)).await.unwrap_err();
        assert!(e.to_string().contains("tier t needs secretRef"), "{e}");

        // A missing secret is a configuration problem, not worth a retry.
        let mut with_ref = openai.clone();
        with_ref.secret_ref = Some(SecretKeyRef {
            name: "openai".into(),
            key: "api-key".into(),
        });
        let e = m.complete(&call(&with_ref, "x", &none)).await.unwrap_err();
        assert!(matches!(e, ModelError::Rejected(_)), "{e}");
        assert!(e.to_string().contains("not found"), "{e}");
    }

    #[test]
    fn openai_wire_format() {
        let mut t = tier(EndpointKind::Openai, "https://api.openai.com/v1");
        t.model = Some("gpt-4o-mini".into());
        let params = json!({"max_tokens": 50, "temperature": 0.2, "other": 1});
        let params = params.as_object().unwrap();
        let body = openai::request_body(&call(&t, "hi", params));
        assert_eq!(
            body,
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 50, "temperature": 0.2})
        );
        // Wrong types are left out rather than sent.
        let params = json!({"max_tokens": "lots", "temperature": "warm"});
        let body = openai::request_body(&call(&t, "hi", params.as_object().unwrap()));
        assert!(body.get("max_tokens").is_none() && body.get("temperature").is_none());

        let none = serde_json::Map::new();
        let c = call(&t, "hi there", &none);
        let reply = json!({"choices": [{"message": {"role": "assistant", "content": "hello"}}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 1}});
        assert_eq!(
            openai::parse_reply(&c, &reply).unwrap(),
            Completion {
                text: "hello".into(),
                input_tokens: 9,
                output_tokens: 1
            }
        );
        let no_usage = json!({"choices": [{"message": {"content": "a b c"}}]});
        let est = openai::parse_reply(&c, &no_usage).unwrap();
        assert_eq!((est.input_tokens, est.output_tokens), (2, 3));
        let refusal = json!({"choices": [{"message": {"content": null, "refusal": "no"}}]});
        assert!(matches!(
            openai::parse_reply(&c, &refusal),
            Err(ModelError::Rejected(_))
        ));
        assert!(matches!(
            openai::parse_reply(&c, &json!({"choices": []})),
            Err(ModelError::Failed(_))
        ));
    }

    #[test]
    fn anthropic_wire_format() {
        let mut t = tier(EndpointKind::Anthropic, "https://api.anthropic.com");
        t.model = Some("claude-haiku".into());
        let none = serde_json::Map::new();
        let body = anthropic::request_body(&call(&t, "hi", &none));
        assert_eq!(
            body,
            json!({"model": "claude-haiku", "max_tokens": 1024,
                   "messages": [{"role": "user", "content": "hi"}]})
        );
        let params = json!({"maxTokens": 64});
        let body = anthropic::request_body(&call(&t, "hi", params.as_object().unwrap()));
        assert_eq!(body["max_tokens"], 64);

        let c = call(&t, "hi", &none);
        let reply = json!({"content": [{"type": "text", "text": "Hel"},
                                       {"type": "tool_use", "id": "x"},
                                       {"type": "text", "text": "lo"}],
                           "usage": {"input_tokens": 3, "output_tokens": 2}});
        assert_eq!(
            anthropic::parse_reply(&c, &reply).unwrap(),
            Completion {
                text: "Hello".into(),
                input_tokens: 3,
                output_tokens: 2
            }
        );
        let e = anthropic::parse_reply(&c, &json!({"content": [], "stop_reason": "max_tokens"}))
            .unwrap_err();
        assert!(e.to_string().contains("max_tokens"), "{e}");
        assert!(matches!(
            anthropic::parse_reply(&c, &json!({"content": "x"})),
            Err(ModelError::Failed(_))
        ));
    }

    fn plan_conversation() -> (plan::Conversation, Vec<plan::ToolSpec>) {
        use plan::{Message, ToolCall};
        let args = json!({"path": "/a"}).as_object().unwrap().clone();
        let conversation = plan::Conversation {
            messages: vec![
                Message::User("tidy up".into()),
                Message::Assistant {
                    text: Some("looking".into()),
                    calls: vec![
                        ToolCall {
                            id: "c1".into(),
                            name: "files__list".into(),
                            arguments: args.clone(),
                        },
                        ToolCall {
                            id: "c2".into(),
                            name: "files__delete".into(),
                            arguments: args,
                        },
                    ],
                },
                Message::ToolResult {
                    call_id: "c1".into(),
                    content: "[\"x\"]".into(),
                    is_error: false,
                },
                Message::ToolResult {
                    call_id: "c2".into(),
                    content: "tool files/delete is not allowed".into(),
                    is_error: true,
                },
            ],
        };
        let tools = vec![plan::ToolSpec {
            name: "files__list".into(),
            description: "List files".into(),
            input_schema: json!({"type": "object"}).as_object().unwrap().clone(),
        }];
        (conversation, tools)
    }

    #[test]
    fn openai_tool_call_wire_format() {
        let t = tier(EndpointKind::Openai, "https://api.openai.com/v1");
        let none = serde_json::Map::new();
        let c = call(&t, "tidy up", &none);
        let (conversation, tools) = plan_conversation();
        let body = openai::plan_request_body(&c, &conversation, &tools);
        assert_eq!(
            body,
            json!({"model": "t",
                   "messages": [
                       {"role": "user", "content": "tidy up"},
                       {"role": "assistant", "content": "looking", "tool_calls": [
                           {"id": "c1", "type": "function",
                            "function": {"name": "files__list", "arguments": "{\"path\":\"/a\"}"}},
                           {"id": "c2", "type": "function",
                            "function": {"name": "files__delete", "arguments": "{\"path\":\"/a\"}"}}]},
                       {"role": "tool", "tool_call_id": "c1", "content": "[\"x\"]"},
                       {"role": "tool", "tool_call_id": "c2",
                        "content": "error: tool files/delete is not allowed"}],
                   "tools": [{"type": "function", "function": {
                       "name": "files__list", "description": "List files",
                       "parameters": {"type": "object"}}}]})
        );

        let reply = json!({"choices": [{"finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "call_9", "type": "function",
                            "function": {"name": "files__list", "arguments": "{\"path\": \"/b\"}"}}]}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 7}});
        let turn = openai::parse_turn(&c, &reply).unwrap();
        assert_eq!(
            turn,
            plan::TurnReply {
                turn: plan::Turn::ToolCalls {
                    text: None,
                    calls: vec![plan::ToolCall {
                        id: "call_9".into(),
                        name: "files__list".into(),
                        arguments: json!({"path": "/b"}).as_object().unwrap().clone(),
                    }],
                },
                input_tokens: 20,
                output_tokens: 7,
            }
        );
        let answer = json!({"choices": [{"message": {"content": "done"}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1}});
        assert_eq!(
            openai::parse_turn(&c, &answer).unwrap().turn,
            plan::Turn::Answer {
                text: "done".into()
            }
        );
        for bad in ["{not json", "[1, 2]"] {
            let reply = json!({"choices": [{"message": {"tool_calls": [
                {"id": "x", "function": {"name": "files__list", "arguments": bad}}]}}]});
            let e = openai::parse_turn(&c, &reply).unwrap_err();
            assert!(matches!(e, ModelError::Failed(_)), "{e}");
            assert!(e.to_string().contains("malformed tool call"), "{e}");
        }
    }

    #[test]
    fn anthropic_tool_use_wire_format() {
        let t = tier(EndpointKind::Anthropic, "https://api.anthropic.com");
        let none = serde_json::Map::new();
        let c = call(&t, "tidy up", &none);
        let (conversation, tools) = plan_conversation();
        let body = anthropic::plan_request_body(&c, &conversation, &tools);
        assert_eq!(
            body,
            json!({"model": "t", "max_tokens": 1024,
                   "messages": [
                       {"role": "user", "content": "tidy up"},
                       {"role": "assistant", "content": [
                           {"type": "text", "text": "looking"},
                           {"type": "tool_use", "id": "c1", "name": "files__list", "input": {"path": "/a"}},
                           {"type": "tool_use", "id": "c2", "name": "files__delete", "input": {"path": "/a"}}]},
                       // Both results in one user turn: the API needs user and assistant to alternate.
                       {"role": "user", "content": [
                           {"type": "tool_result", "tool_use_id": "c1", "content": "[\"x\"]", "is_error": false},
                           {"type": "tool_result", "tool_use_id": "c2",
                            "content": "tool files/delete is not allowed", "is_error": true}]}],
                   "tools": [{"name": "files__list", "description": "List files",
                              "input_schema": {"type": "object"}}]})
        );

        let reply = json!({"type": "message", "role": "assistant", "stop_reason": "tool_use",
            "content": [{"type": "text", "text": "Listing."},
                        {"type": "tool_use", "id": "toolu_1", "name": "files__list", "input": {"path": "/b"}}],
            "usage": {"input_tokens": 30, "output_tokens": 9}});
        let turn = anthropic::parse_turn(&c, &reply).unwrap();
        assert_eq!(
            turn,
            plan::TurnReply {
                turn: plan::Turn::ToolCalls {
                    text: Some("Listing.".into()),
                    calls: vec![plan::ToolCall {
                        id: "toolu_1".into(),
                        name: "files__list".into(),
                        arguments: json!({"path": "/b"}).as_object().unwrap().clone(),
                    }],
                },
                input_tokens: 30,
                output_tokens: 9,
            }
        );
        let bad = json!({"content": [{"type": "tool_use", "id": "x", "name": "files__list", "input": "str"}]});
        let e = anthropic::parse_turn(&c, &bad).unwrap_err();
        assert!(e.to_string().contains("malformed tool_use"), "{e}");
    }

    #[tokio::test]
    async fn builtin_models_answer_a_plan_turn_without_tools() {
        let none = serde_json::Map::new();
        let echo = tier(EndpointKind::Builtin, "builtin:echo");
        let (conversation, tools) = plan_conversation();
        let r = Models::default()
            .turn(&call(&echo, "hi", &none), &conversation, &tools)
            .await
            .unwrap();
        assert_eq!(
            r.turn,
            plan::Turn::Answer {
                text: "echo: hi".into()
            }
        );
    }

    #[test]
    fn idempotency_keys_are_stable_per_task_and_step() {
        assert_eq!(idempotency_key("t-1", 1), "t-1/model/1");
        assert_ne!(idempotency_key("t-1", 1), idempotency_key("t-1", 2));
        assert_eq!(tool_idempotency_key("t-1", 2), "t-1/tool/2");
        assert_ne!(tool_idempotency_key("t-1", 2), idempotency_key("t-1", 2));
    }
}
