//! The HTTP side shared by the remote model clients: one `reqwest::Client` (rustls, connect timeout,
//! no redirects), endpoint checks, capped response bodies, status classification and secret-free
//! error excerpts.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};

use super::ModelError;
use crate::secrets::SecretValue;

/// Timeouts and limits of the model endpoints' HTTP client.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Longest a TCP + TLS connect may take.
    pub connect_timeout: Duration,
    /// Longest a whole request may take, body included. The worker's own call timeout still applies
    /// on top; this one turns a hung endpoint into a retryable error even without it.
    pub request_timeout: Duration,
    /// Largest response body read; a bigger one fails the attempt instead of exhausting memory.
    pub max_response_bytes: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            // Below the worker's default 120 s call timeout, so a hung endpoint reports as such.
            request_timeout: Duration::from_secs(110),
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The HTTP client for model endpoints could not be built (TLS set-up, proxy settings).
#[derive(Debug, thiserror::Error)]
#[error("building the HTTP client for model endpoints: {0}")]
pub struct HttpSetupError(#[from] reqwest::Error);

/// Longest error-body excerpt kept in an error.
const EXCERPT_CHARS: usize = 200;

pub(crate) struct Http {
    client: reqwest::Client,
    max_response_bytes: usize,
}

impl Http {
    pub(crate) fn new(opts: &HttpOptions) -> Result<Http, HttpSetupError> {
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            // A redirect would carry the API key to wherever it points (reqwest strips
            // `Authorization` across hosts but not `x-api-key`); model APIs do not redirect.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentplane/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Http {
            client,
            max_response_bytes: opts.max_response_bytes,
        })
    }

    /// POSTs `body` as JSON and returns the parsed JSON reply of a 2xx response.
    ///
    /// `provider` names the endpoint kind in errors; `key` is only used to scrub error excerpts.
    pub(crate) async fn post_json(
        &self,
        provider: &str,
        url: Url,
        headers: HeaderMap,
        body: &serde_json::Value,
        key: &SecretValue,
    ) -> Result<serde_json::Value, ModelError> {
        let host = url.host_str().unwrap_or("?").to_owned();
        let mut resp = self
            .client
            .post(url)
            .headers(headers)
            .json(body)
            .send()
            .await
            .map_err(|e| transport_error(provider, &host, e))?;
        let status = resp.status();
        let bytes = self.read_capped(&mut resp).await.map_err(|e| match e {
            ReadError::TooLarge => ModelError::Failed(format!(
                "{provider} response from {host} is larger than {} bytes (HTTP {status})",
                self.max_response_bytes
            )),
            ReadError::Http(e) => transport_error(provider, &host, e),
        })?;
        if !status.is_success() {
            let message = format!(
                "{provider} endpoint {host} returned HTTP {}: {}",
                status.as_u16(),
                excerpt(&bytes, key)
            );
            return Err(if retryable(status) {
                ModelError::Failed(message)
            } else {
                ModelError::Rejected(message)
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            // serde_json's syntax errors name a position, never the content.
            ModelError::Failed(format!(
                "{provider} endpoint {host} returned a body that is not JSON: {e}"
            ))
        })
    }

    async fn read_capped(&self, resp: &mut reqwest::Response) -> Result<Vec<u8>, ReadError> {
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_response_bytes as u64)
        {
            return Err(ReadError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(ReadError::Http)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(ReadError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

/// Statuses a retry may fix: timeouts, conflicts (an idempotency key still in use), rate limits and
/// server-side faults (including Anthropic's 529 overloaded). Every other non-2xx (400, 401, 403,
/// 404, 422, redirects) is a request or configuration problem.
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 425 | 429) || status.is_server_error()
}

fn transport_error(provider: &str, host: &str, e: reqwest::Error) -> ModelError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broke off while sending the response"
    } else {
        "failed"
    };
    // `without_url`: the URL is already named by host, and the error chain then holds only the cause.
    let cause = std::error::Error::source(&e.without_url())
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    ModelError::Failed(format!("{provider} request to {host} {what}{cause}"))
}

/// The endpoint's own error message (`error.message` in both OpenAI's and Anthropic's error bodies)
/// or the start of the body, on one line, at most [`EXCERPT_CHARS`] characters, with the API key and
/// anything that looks like a (masked) echo of it removed.
pub(crate) fn excerpt(body: &[u8], key: &SecretValue) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error"))
        })
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut text = match key.expose_str() {
        Some(k) if !k.is_empty() => message.replace(k, "<redacted>"),
        _ => message,
    };
    // Providers echo keys masked ("sk-proj-abc***xyz"); drop any word sharing the key's first
    // 8 characters. Short keys are skipped so that common words survive.
    if let Some(prefix) = key.expose_str().and_then(|k| k.get(..8)) {
        text = text
            .split_whitespace()
            .map(|w| if w.contains(prefix) { "<redacted>" } else { w })
            .collect::<Vec<_>>()
            .join(" ");
    }
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = one_line.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".into();
    }
    if one_line.chars().count() > EXCERPT_CHARS {
        let cut: String = one_line.chars().take(EXCERPT_CHARS).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

/// Checks a tier's endpoint and appends the API path unless the endpoint already ends in one of
/// `accepted`. The key may only travel over https, or plain http to this machine (local servers).
pub(crate) fn endpoint_url(
    tier: &str,
    endpoint: &str,
    accepted: &[&str],
    append: &str,
) -> Result<Url, ModelError> {
    let rejected = |why: &str| ModelError::Rejected(format!("tier {tier}: endpoint {why}"));
    let base = endpoint.trim_end_matches('/');
    let full = if accepted.iter().any(|s| base.ends_with(s)) {
        base.to_owned()
    } else {
        format!("{base}{append}")
    };
    let url = Url::parse(&full).map_err(|e| rejected(&format!("is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(rejected(
            "must not carry credentials; put the API key in the tier's secretRef",
        ));
    }
    // `host_str` writes IPv6 addresses in brackets.
    let host = url.host_str().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        "http" => Err(rejected(
            "must use https (plain http only to localhost), or the API key would cross the network in clear",
        )),
        other => Err(rejected(&format!("has unsupported scheme {other:?}"))),
    }
}

/// Headers every remote call carries besides the credential.
pub(crate) fn common_headers(
    idempotency_key: &str,
    traceparent: Option<&str>,
) -> Result<HeaderMap, ModelError> {
    let mut h = HeaderMap::new();
    let key = HeaderValue::from_str(idempotency_key).map_err(|_| {
        ModelError::Rejected("the idempotency key is not a valid header value".into())
    })?;
    h.insert(HeaderName::from_static("idempotency-key"), key);
    // Only a well-formed W3C traceparent is forwarded: it came through a queue message.
    if let Some(tp) = traceparent.filter(|tp| is_traceparent(tp))
        && let Ok(v) = HeaderValue::from_str(tp)
    {
        h.insert(HeaderName::from_static("traceparent"), v);
    }
    Ok(h)
}

/// A credential header value, marked sensitive so that HTTP-layer logging never prints it.
pub(crate) fn secret_header(
    tier: &str,
    prefix: &str,
    key: &SecretValue,
) -> Result<HeaderValue, ModelError> {
    let mut bytes = Vec::with_capacity(prefix.len() + key.len());
    bytes.extend_from_slice(prefix.as_bytes());
    bytes.extend_from_slice(key.expose());
    // Zeroed when dropped, like the key.
    let bytes = SecretValue::new(bytes);
    let mut v = HeaderValue::from_bytes(bytes.expose()).map_err(|_| {
        ModelError::Rejected(format!(
            "tier {tier}: the API key holds characters an HTTP header cannot carry (a stray newline?)"
        ))
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// `00-<32 hex>-<16 hex>-<2 hex>` (version 00 of the W3C Trace Context format).
fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// A parameter as a positive integer, under either spelling (`max_tokens` or `maxTokens`).
pub(crate) fn param_u64(
    params: &serde_json::Map<String, serde_json::Value>,
    snake: &str,
    camel: &str,
) -> Option<u64> {
    params
        .get(snake)
        .or_else(|| params.get(camel))
        .and_then(serde_json::Value::as_u64)
        .filter(|n| *n > 0)
}

/// A parameter as a finite number.
pub(crate) fn param_f64(
    params: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Option<f64> {
    params
        .get(name)
        .and_then(serde_json::Value::as_f64)
        .filter(|n| n.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_completed() {
        let u = |e: &str| endpoint_url("t", e, &["/chat/completions"], "/chat/completions");
        assert_eq!(
            u("https://api.openai.com/v1").unwrap().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            u("https://api.openai.com/v1/").unwrap().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            u("https://x.example/v1/chat/completions").unwrap().as_str(),
            "https://x.example/v1/chat/completions"
        );
        assert!(u("http://127.0.0.1:8080/v1").is_ok());
        assert!(u("http://localhost:8080/v1").is_ok());
        assert!(u("http://[::1]:8080/v1").is_ok());
        for bad in [
            "http://api.example.com/v1",
            "https://user:pw@api.example.com/v1",
            "ftp://x/v1",
            "not a url",
        ] {
            assert!(matches!(u(bad), Err(ModelError::Rejected(_))), "{bad}");
        }
    }

    #[test]
    fn excerpts_are_short_single_line_and_secret_free() {
        let key = SecretValue::from("sk-proj-abcdefghijklmnop");
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-proj-abcdefghijklmnop.\nAlso sk-proj-ab***op"}}"#;
        let e = excerpt(body, &key);
        assert!(!e.contains("abcdefghijklmnop"), "{e}");
        assert!(!e.contains("sk-proj-ab"), "{e}");
        assert!(!e.contains('\n'));
        assert!(e.starts_with("Incorrect API key provided"), "{e}");

        let long = "x".repeat(5000);
        let e = excerpt(long.as_bytes(), &key);
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert_eq!(excerpt(b"", &key), "(empty body)");
    }

    #[test]
    fn traceparents_are_validated() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("00-xyz-00f067aa0ba902b7-01"));
        assert!(!is_traceparent("garbage\r\nx-api-key: y"));
        let h = common_headers("task-1/model/1", Some("nope")).unwrap();
        assert!(h.get("traceparent").is_none());
        assert_eq!(h["idempotency-key"], "task-1/model/1");
    }

    #[test]
    fn credential_headers_are_sensitive_and_checked() {
        let v = secret_header("t", "Bearer ", &SecretValue::from("sk-1")).unwrap();
        assert!(v.is_sensitive());
        assert_eq!(v, "Bearer sk-1");
        let e = secret_header("t", "", &SecretValue::from("sk-1\nx")).unwrap_err();
        assert!(!e.to_string().contains("sk-1"));
    }

    #[test]
    fn statuses_are_classified() {
        for s in [408, 409, 429, 500, 502, 503, 529] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 413, 422] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
