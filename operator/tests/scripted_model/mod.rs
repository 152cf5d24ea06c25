//! A scripted model endpoint for the plan tests. No LLM runs on this machine, so the model is an HTTP
//! server that speaks the exact wire formats of OpenAI chat completions (`tools`,
//! `choices[0].message.tool_calls[]` with arguments as a JSON string, results as `role: tool`
//! messages) and Anthropic Messages (`tools`, `tool_use` content blocks, results as `tool_result`
//! blocks in the next user turn); which one a request gets is chosen by its path. Its script picks
//! the reply from the number of assistant turns in the request, so a model step asked again after a
//! crash gets the same reply, and its final answer quotes every tool result the request carried back.
// Each test crate that includes this module uses a different part of it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use agentplane::store::TaskRecord;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{
    AgentPolicySpec, EndpointKind, IntentRule, McpServer, ModelTier, RateLimitAction, SecretKeyRef,
    ToolRule,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One scripted model turn.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Ask for these tool calls (model-facing name `server__tool`, arguments).
    Calls(Vec<(&'static str, Value)>),
    /// Answer, quoting every tool result in the request.
    Answer,
}

#[derive(Default)]
pub struct ModelState {
    pub script: Vec<Scripted>,
    /// Requests received: (path, idempotency key, body).
    pub seen: Vec<(String, String, Value)>,
    /// Turn index whose reply is held back until `release` is signalled.
    pub hold: Option<usize>,
}

#[derive(Clone)]
pub struct ModelServer {
    pub state: Arc<Mutex<ModelState>>,
    pub release: Arc<tokio::sync::watch::Sender<bool>>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl ModelServer {
    pub async fn start(script: Vec<Scripted>) -> ModelServer {
        let (release, _) = tokio::sync::watch::channel(false);
        let mut server = ModelServer {
            state: Arc::new(Mutex::new(ModelState {
                script,
                ..Default::default()
            })),
            release: Arc::new(release),
            base: String::new(),
        };
        let app = axum::Router::new()
            .fallback(model_reply)
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        server.base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    pub fn seen(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Requests for turn `turn` (0-based) seen so far.
    pub fn asked_for_turn(&self, turn: usize) -> usize {
        self.seen()
            .iter()
            .filter(|(_, _, body)| assistant_turns(body) == turn)
            .count()
    }
}

pub fn assistant_turns(body: &Value) -> usize {
    body["messages"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] == "assistant").count())
        .unwrap_or(0)
}

/// Every tool result the request carries back, in order, in either format.
pub fn tool_results(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for m in body["messages"].as_array().into_iter().flatten() {
        if m["role"] == "tool" {
            out.push(m["content"].as_str().unwrap_or("").to_owned());
        }
        for block in m["content"].as_array().into_iter().flatten() {
            if block["type"] == "tool_result" {
                out.push(block["content"].as_str().unwrap_or("").to_owned());
            }
        }
    }
    out
}

pub async fn model_reply(
    State(server): State<ModelServer>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let path = uri.path().to_owned();
    let turn = assistant_turns(&body);
    let (scripted, hold) = {
        let mut s = server.state.lock().unwrap();
        s.seen.push((path.clone(), key, body.clone()));
        let scripted = s
            .script
            .get(turn)
            .or(s.script.last())
            .cloned()
            .unwrap_or(Scripted::Answer);
        (scripted, s.hold == Some(turn))
    };
    if hold {
        let mut released = server.release.subscribe();
        let _ = released.wait_for(|r| *r).await;
    }
    let anthropic = path.ends_with("/messages");
    match scripted {
        Scripted::Answer => {
            let text = format!("results: {}", tool_results(&body).join(" | "));
            if anthropic {
                axum::Json(
                    json!({"id": format!("msg_{turn}"), "type": "message", "role": "assistant",
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 10, "output_tokens": 5}}),
                )
                .into_response()
            } else {
                axum::Json(
                    json!({"id": format!("chatcmpl-{turn}"), "object": "chat.completion",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}),
                )
                .into_response()
            }
        }
        Scripted::Calls(calls) => {
            if anthropic {
                let blocks: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        json!({"type": "tool_use", "id": format!("toolu_{turn}_{i}"), "name": name, "input": args})
                    })
                    .collect();
                axum::Json(
                    json!({"id": format!("msg_{turn}"), "type": "message", "role": "assistant",
                    "content": blocks, "stop_reason": "tool_use",
                    "usage": {"input_tokens": 10, "output_tokens": 5}}),
                )
                .into_response()
            } else {
                let tool_calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, (name, args))| {
                        json!({"id": format!("call_{turn}_{i}"), "type": "function",
                               "function": {"name": name, "arguments": args.to_string()}})
                    })
                    .collect();
                axum::Json(json!({"id": format!("chatcmpl-{turn}"), "object": "chat.completion",
                    "choices": [{"index": 0, "finish_reason": "tool_calls",
                                 "message": {"role": "assistant", "content": null, "tool_calls": tool_calls}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}))
                .into_response()
            }
        }
    }
}

/// The name of the policy's model tier served by this endpoint.
pub const TIER: &str = "scripted";
/// The API key the tier sends (from the secret `model/api-key`).
pub const KEY: &str = "sk-test-plan-0123456789abcdef";

/// The model tier for the endpoint at `base` (`ModelServer::base`), speaking `kind`'s format, its
/// key in the secret `model/api-key` (see [`write_key`]).
pub fn tier(kind: EndpointKind, base: &str) -> ModelTier {
    ModelTier {
        name: TIER.into(),
        endpoint_kind: kind,
        endpoint: format!("{base}/v1"),
        model: Some("plan-model".into()),
        price_per_1k_input_micros: 1000,
        price_per_1k_output_micros: 2000,
        privacy_levels: vec![],
        gpu: false,
        secret_ref: Some(SecretKeyRef {
            name: "model".into(),
            key: "api-key".into(),
        }),
    }
}

/// Writes the tier's key where an embedded runtime with data directory `data_dir` reads secrets.
pub fn write_key(data_dir: &Path) {
    std::fs::create_dir_all(data_dir.join("secrets/model")).unwrap();
    std::fs::write(data_dir.join("secrets/model/api-key"), KEY).unwrap();
}

/// `base` policy made to run `intent` as a plan: its one model tier is the scripted model at `base_url`
/// ([`tier`]), the intent's rule allows `tools` of `servers`.
pub fn plan_policy(
    mut base: AgentPolicySpec,
    intent: &str,
    kind: EndpointKind,
    base_url: &str,
    servers: Vec<McpServer>,
    tools: Vec<ToolRule>,
) -> AgentPolicySpec {
    base.models = vec![tier(kind, base_url)];
    base.intents.push(IntentRule {
        kind: intent.into(),
        allowed: true,
        requires_approval: false,
        privacy_levels: vec![],
        rate_limits: vec![],
        on_rate_limit: RateLimitAction::Deny,
        tools,
        max_steps: None,
    });
    base.mcp_servers = servers;
    base
}

// The recorder plan both runtimes' tests run (needs the crate's `mcp_peers` module too).

/// Three writes, one per turn, then the answer.
pub fn three_records() -> Vec<Scripted> {
    let write = |k: &str, v: &str| {
        Scripted::Calls(vec![("rec__write_record", json!({"key": k, "value": v}))])
    };
    vec![
        write("a", "1"),
        write("b", "2"),
        write("c", "3"),
        Scripted::Answer,
    ]
}

/// The three-record plan succeeded with every result in its answer, and the recorder saw each
/// write exactly once, under its step's key.
pub fn assert_three_records_once(t: &TaskRecord, log: &Path) {
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    assert_eq!(
        t.status.result.as_deref(),
        Some("results: stored a=1 | stored b=2 | stored c=3")
    );
    let got: Vec<(String, String, bool)> = crate::mcp_peers::recorded(log)
        .into_iter()
        .map(|c| {
            (
                c.arguments["key"].as_str().unwrap().to_owned(),
                c.key,
                c.duplicate,
            )
        })
        .collect();
    let want: Vec<(String, String, bool)> = [("a", 2), ("b", 4), ("c", 6)]
        .iter()
        .map(|(k, step)| (k.to_string(), format!("{}/tool/{step}", t.id), false))
        .collect();
    assert_eq!(got, want, "each call exactly once, under its step key");
}
