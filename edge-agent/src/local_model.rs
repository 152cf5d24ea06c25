//! The client of the device's local model: an OpenAI-compatible chat-completions endpoint on this
//! machine (llama.cpp's `llama-server`, llama-cpp-python's server, ...). Plain HTTP: the edge binary
//! does no inference itself.
//!
//! The prompts sent here are the ones that must not leave the device, so the client refuses any
//! address that is not loopback, ignores proxy settings from the environment (`HTTP_PROXY` would
//! otherwise carry a private prompt off the machine) and follows no redirects.

use std::time::Duration;

use reqwest_edge as reqwest;
use serde::Deserialize;

/// Largest answer body read from the local model; a larger one fails the intent instead of filling
/// memory or the outbox.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LocalModelError {
    #[error("--local-model {0:?} is not an http:// URL")]
    BadUrl(String),
    #[error(
        "--local-model {0:?} is not on this device: private intents may only go to a loopback address (127.0.0.0/8, [::1], localhost)"
    )]
    NotLoopback(String),
    #[error("cannot build the local model client: {0}")]
    Client(String),
    #[error("the local model at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the local model at {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "the local model at {url} did not answer with an OpenAI chat completion ({detail}); is --local-model the server's /v1 base URL?"
    )]
    Garbage { url: String, detail: String },
    #[error("the local model's answer is larger than {limit} bytes; it was discarded")]
    TooLarge { limit: usize },
}

impl LocalModelError {
    /// Whether calling again later may succeed (the model server is down, starting or busy). Any
    /// other failure is final for the intent: it is recorded as failed with this error.
    pub fn is_transient(&self) -> bool {
        match self {
            LocalModelError::Unreachable { .. } => true,
            LocalModelError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// How to reach the local model.
#[derive(Clone, Debug)]
pub struct LocalModelConfig {
    /// Base URL of the OpenAI-compatible API, e.g. `http://127.0.0.1:8080/v1`.
    pub url: String,
    /// The `model` field sent (single-model servers ignore it).
    pub model: String,
    /// Most tokens the model may generate for one intent.
    pub max_tokens: u32,
    /// Longest one call may take (CPU inference on a small board is slow).
    pub timeout: Duration,
}

/// What the local model answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub model: Option<String>,
}

#[derive(Clone, Debug)]
pub struct LocalModel {
    http: reqwest::Client,
    endpoint: String,
    cfg: LocalModelConfig,
}

impl LocalModel {
    pub fn new(cfg: LocalModelConfig) -> Result<Self, LocalModelError> {
        let base = cfg.url.trim_end_matches('/').to_owned();
        let parsed =
            reqwest::Url::parse(&base).map_err(|_| LocalModelError::BadUrl(base.clone()))?;
        if parsed.scheme() != "http" {
            return Err(LocalModelError::BadUrl(base));
        }
        let host = parsed.host_str().unwrap_or("");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(LocalModelError::NotLoopback(base));
        }
        // The client is plain HTTP, but reqwest's builder needs rustls's provider chosen all the same.
        crate::gateway::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| LocalModelError::Client(e.to_string()))?;
        Ok(LocalModel {
            endpoint: format!("{base}/chat/completions"),
            http,
            cfg,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs one intent on the local model: the prompt as the user's message, the intent type as the
    /// system message (the same instruction the cloud tiers get).
    pub async fn complete(
        &self,
        intent_type: &str,
        prompt: &str,
    ) -> Result<Completion, LocalModelError> {
        let body = serde_json::json!({
            "model": self.cfg.model,
            "messages": [
                {"role": "system", "content": format!("Task: {intent_type}")},
                {"role": "user", "content": prompt},
            ],
            "max_tokens": self.cfg.max_tokens,
            "stream": false,
        });
        let resp = self
            .http
            .post(&self.endpoint)
            .json(&body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let bytes = self.read_capped(resp).await?;
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&bytes);
            return Err(LocalModelError::Status {
                url: self.endpoint.clone(),
                status,
                body: text.chars().take(300).collect(),
            });
        }
        parse_completion(&bytes).map_err(|detail| LocalModelError::Garbage {
            url: self.endpoint.clone(),
            detail,
        })
    }

    async fn read_capped(&self, mut resp: reqwest::Response) -> Result<Vec<u8>, LocalModelError> {
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(LocalModelError::TooLarge {
                    limit: MAX_ANSWER_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn unreachable(&self, e: reqwest::Error) -> LocalModelError {
        LocalModelError::Unreachable {
            url: self.endpoint.clone(),
            detail: crate::gateway::error_chain(&e),
        }
    }
}

#[derive(Deserialize)]
struct ChatCompletion {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

/// The first choice's text, or why the body is not a chat completion.
fn parse_completion(bytes: &[u8]) -> Result<Completion, String> {
    let c: ChatCompletion = serde_json::from_slice(bytes).map_err(|e| {
        let head: String = String::from_utf8_lossy(bytes).chars().take(80).collect();
        format!("{e}; the answer began {head:?}")
    })?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| "the answer has no choices".to_owned())?;
    Ok(Completion {
        text: choice.message.content.unwrap_or_default(),
        model: c.model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> LocalModelConfig {
        LocalModelConfig {
            url: url.into(),
            model: "local".into(),
            max_tokens: 16,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn only_loopback_http_urls_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080/v1",
            "http://127.9.9.9:1/v1/",
            "http://localhost:8080/v1",
            "http://[::1]:8080/v1",
        ] {
            let m = LocalModel::new(cfg(ok)).unwrap();
            assert!(m.endpoint().ends_with("/v1/chat/completions"), "{ok}");
        }
        for far in ["http://10.0.0.2:8080/v1", "http://example.com/v1"] {
            let err = LocalModel::new(cfg(far)).unwrap_err();
            assert!(
                matches!(err, LocalModelError::NotLoopback(_)),
                "{far}: {err}"
            );
        }
        for bad in ["https://127.0.0.1/v1", "not a url", "file:///tmp/x"] {
            assert!(matches!(
                LocalModel::new(cfg(bad)).unwrap_err(),
                LocalModelError::BadUrl(_)
            ));
        }
    }

    #[test]
    fn completions_are_parsed_and_garbage_is_explained() {
        let ok = br#"{"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}"#;
        assert_eq!(
            parse_completion(ok).unwrap(),
            Completion {
                text: "hi".into(),
                model: Some("m".into())
            }
        );
        let err = parse_completion(b"<html>not json</html>").unwrap_err();
        assert!(err.contains("<html>"), "{err}");
        let err = parse_completion(br#"{"choices":[]}"#).unwrap_err();
        assert!(err.contains("no choices"), "{err}");
    }

    #[test]
    fn only_down_or_busy_servers_are_retried() {
        let status = |status| LocalModelError::Status {
            url: String::new(),
            status,
            body: String::new(),
        };
        assert!(status(503).is_transient() && status(429).is_transient());
        assert!(!status(400).is_transient() && !status(404).is_transient());
        assert!(!LocalModelError::TooLarge { limit: 1 }.is_transient());
    }
}
