//! The HTTP client for the gateway (`/v1/...`, see `agentplane_api::wire`).
//!
//! Every answer is untrusted: bodies are read with a size cap and anything that does not parse is a
//! `Garbage` error (retried later), never a panic. Reads are signed with the device key; a 401 carrying
//! the gateway's clock lets a device whose clock is wrong correct itself by an offset.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use agentplane_api::wire::{
    AddKeyRequest, AddKeyResponse, EnrollRequest, EnrollResponse, ErrorBody, READ_AUTH_SCHEME,
    SubmitResponse, TRACEPARENT_HEADER, TaskView, add_key_message, read_auth_message,
};
use agentplane_api::{KeyAlgorithm, PublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest_edge as reqwest;
use reqwest_edge::StatusCode;
use tracing::Instrument as _;

use crate::identity::DeviceSigner;
use crate::telemetry;

/// Largest gateway answer read; a task result bigger than this is refused as garbage.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    #[error("gateway error {status}: {message}")]
    Server { status: u16, message: String },
    #[error("gateway answered {status} with a body that is not the expected JSON: {detail}")]
    Garbage { status: u16, detail: String },
    #[error("gateway refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        retry_after_secs: Option<u64>,
        server_time: Option<i64>,
    },
    #[error("invalid gateway URL {0:?}")]
    BadUrl(String),
    #[error("cannot sign the request: {0}")]
    Signing(String),
}

impl GatewayError {
    /// Whether a send should be retried later. Only answers that say "this envelope can never be
    /// accepted" are final; auth errors are retried because enrollment or a key rotation may be pending.
    pub fn is_permanent(&self) -> bool {
        match self {
            GatewayError::Refused { status, .. } => {
                matches!(*status, 400 | 409 | 410 | 413 | 415 | 422)
            }
            _ => false,
        }
    }

    /// The gateway's requested pause, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Refused {
                retry_after_secs: Some(s),
                ..
            } => Some(Duration::from_secs((*s).min(3600))),
            _ => None,
        }
    }

    /// Whether the gateway was reached at all (for the online/offline indicator).
    pub fn reached_gateway(&self) -> bool {
        !matches!(
            self,
            GatewayError::Unreachable(_) | GatewayError::BadUrl(_) | GatewayError::Signing(_)
        )
    }
}

/// Makes rustls use the ring provider (smaller than aws-lc on a device). Harmless when a provider is
/// already installed (then that one is used). Call before building any HTTP client.
pub fn install_crypto_provider() {
    let _ = rustls_ring::crypto::ring::default_provider().install_default();
}

/// A client for one gateway.
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base: String,
    /// Seconds to add to the local clock for signed reads (learned from the gateway's 401 answers).
    clock_offset: Arc<AtomicI64>,
}

impl GatewayClient {
    pub fn new(base: &str) -> Result<Self, GatewayError> {
        let base = base.trim().trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|_| GatewayError::BadUrl(base.clone()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(GatewayError::BadUrl(base));
        }
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("agentplane-edge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GatewayError::Unreachable(e.to_string()))?;
        Ok(GatewayClient {
            http,
            base,
            clock_offset: Arc::new(AtomicI64::new(0)),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Starts signed reads from a known offset (e.g. one remembered from an earlier run).
    pub fn set_clock_offset_secs(&self, offset: i64) {
        self.clock_offset.store(offset, Ordering::Relaxed);
    }

    pub fn clock_offset_secs(&self) -> i64 {
        self.clock_offset.load(Ordering::Relaxed)
    }

    /// `POST /v1/devices/enroll`.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, GatewayError> {
        let resp = self
            .http
            .post(format!("{}/v1/devices/enroll", self.base))
            .json(req)
            .send()
            .await
            .map_err(unreachable)?;
        parse_json(resp).await
    }

    /// `POST /v1/devices/{id}/keys`: registers a rotated key, signed by `current` and by `next`.
    /// A `clock_skew` answer corrects this client's clock offset from the gateway's time and the
    /// request is signed again, once.
    pub async fn add_key(
        &self,
        device_id: &str,
        current: &dyn DeviceSigner,
        next: &dyn DeviceSigner,
        retire_current_after_secs: Option<u64>,
    ) -> Result<AddKeyResponse, GatewayError> {
        let public_key = PublicKey {
            id: next.key_id().to_owned(),
            alg: KeyAlgorithm::Ed25519,
            key: agentplane_api::envelope::encode_public_key(&next.public_key()),
            not_after: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ts = jiff::Timestamp::now().as_second() + self.clock_offset_secs();
            let message = add_key_message(device_id, &public_key, ts, retire_current_after_secs);
            let sign = |who: &dyn DeviceSigner| {
                who.sign(&message)
                    .map(|s| B64.encode(s.to_bytes()))
                    .map_err(|e| GatewayError::Signing(e.to_string()))
            };
            let req = AddKeyRequest {
                public_key: public_key.clone(),
                ts,
                signed_by: current.key_id().to_owned(),
                signature: sign(current)?,
                proof: sign(next)?,
                retire_signing_key_after_secs: retire_current_after_secs,
            };
            let resp = self
                .http
                .post(format!("{}/v1/devices/{device_id}/keys", self.base))
                .json(&req)
                .send()
                .await
                .map_err(unreachable)?;
            match parse_json(resp).await {
                Err(GatewayError::Refused {
                    code,
                    server_time: Some(server),
                    ..
                }) if code == "clock_skew" && attempt == 1 => {
                    self.clock_offset.store(
                        server - jiff::Timestamp::now().as_second(),
                        Ordering::Relaxed,
                    );
                }
                other => return other,
            }
        }
    }

    /// `POST /v1/intents` with the envelope exactly as stored.
    pub async fn submit(
        &self,
        envelope_json: &str,
        traceparent: &str,
    ) -> Result<SubmitResponse, GatewayError> {
        // This attempt's span, a child of the capture; the gateway's span becomes its child. Untraced
        // (or a stored value the propagator refuses), the stored traceparent goes out as it is.
        let span = tracing::info_span!("edge.submit", otel.kind = "client");
        let header = if telemetry::set_remote_parent(&span, traceparent) {
            telemetry::traceparent_of(&span).unwrap_or_else(|| traceparent.to_owned())
        } else {
            traceparent.to_owned()
        };
        async {
            let resp = self
                .http
                .post(format!("{}/v1/intents", self.base))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(TRACEPARENT_HEADER, header)
                .body(envelope_json.to_owned())
                .send()
                .await
                .map_err(unreachable)?;
            parse_json(resp).await
        }
        .instrument(span)
        .await
    }

    /// `GET /v1/tasks/{id}` as the device that submitted it.
    pub async fn task(
        &self,
        task_id: &str,
        device_id: &str,
        signer: &dyn DeviceSigner,
    ) -> Result<TaskView, GatewayError> {
        let path = format!("/v1/tasks/{task_id}");
        let first = self.signed_get(&path, device_id, signer).await;
        match first {
            Err(GatewayError::Refused {
                status: 401,
                server_time: Some(server),
                ..
            }) => {
                // Our clock may be off: adopt the gateway's and try once more. The retry happens only
                // when the correction changes what we would sign, so a 401 for another reason is not
                // retried in vain.
                let local = jiff::Timestamp::now().as_second();
                let offset = server - local;
                if (offset - self.clock_offset_secs()).abs() > 1 {
                    tracing::warn!(
                        offset,
                        "device clock differs from the gateway's; correcting signed reads"
                    );
                    self.clock_offset.store(offset, Ordering::Relaxed);
                    return self.signed_get(&path, device_id, signer).await;
                }
                first
            }
            other => other,
        }
    }

    async fn signed_get(
        &self,
        path: &str,
        device_id: &str,
        signer: &dyn DeviceSigner,
    ) -> Result<TaskView, GatewayError> {
        let ts = jiff::Timestamp::now().as_second() + self.clock_offset_secs();
        let sig = signer
            .sign(&read_auth_message("GET", path, ts))
            .map_err(|e| GatewayError::Signing(e.to_string()))?;
        let auth = format!(
            "{READ_AUTH_SCHEME} device={device_id},key={},ts={ts},sig={}",
            signer.key_id(),
            B64.encode(sig.to_bytes())
        );
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::AUTHORIZATION, auth)
            .send()
            .await
            .map_err(unreachable)?;
        parse_json(resp).await
    }
}

fn unreachable(e: reqwest::Error) -> GatewayError {
    GatewayError::Unreachable(error_chain(&e))
}

/// The error and its causes on one line: "error sending request" alone does not say "connection
/// refused".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, GatewayError> {
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(GatewayError::Garbage {
                        status,
                        detail: format!("answer larger than {MAX_RESPONSE_BYTES} bytes"),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(unreachable(e)),
        }
    }
}

async fn parse_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, GatewayError> {
    let status = resp.status();
    let body = read_capped(resp).await?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| GatewayError::Garbage {
            status: status.as_u16(),
            detail: e.to_string(),
        });
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
    if status.is_server_error() {
        let message = match parsed {
            Some(b) => format!("{}: {}", b.error.code, b.error.message),
            None => snippet(&body),
        };
        return Err(GatewayError::Server {
            status: status.as_u16(),
            message,
        });
    }
    match parsed {
        Some(b) => Err(GatewayError::Refused {
            status: status.as_u16(),
            code: b.error.code,
            message: b.error.message,
            retry_after_secs: b.error.retry_after_secs,
            server_time: b.error.server_time,
        }),
        None if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT =>
        {
            Err(GatewayError::Refused {
                status: status.as_u16(),
                code: "retry".into(),
                message: snippet(&body),
                retry_after_secs: None,
                server_time: None,
            })
        }
        None => Err(GatewayError::Garbage {
            status: status.as_u16(),
            detail: snippet(&body),
        }),
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.chars().filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(GatewayClient::new("http://127.0.0.1:8787/").is_ok());
        assert_eq!(
            GatewayClient::new("http://127.0.0.1:8787/").unwrap().base(),
            "http://127.0.0.1:8787"
        );
        assert!(GatewayClient::new("ftp://x").is_err());
        assert!(GatewayClient::new("not a url").is_err());
    }

    #[test]
    fn only_final_answers_are_permanent() {
        let refused = |status| GatewayError::Refused {
            status,
            code: "x".into(),
            message: "m".into(),
            retry_after_secs: None,
            server_time: None,
        };
        assert!(refused(400).is_permanent());
        assert!(refused(422).is_permanent());
        assert!(!refused(401).is_permanent());
        assert!(!refused(429).is_permanent());
        assert!(!GatewayError::Unreachable("x".into()).is_permanent());
        assert!(
            !GatewayError::Server {
                status: 500,
                message: "x".into()
            }
            .is_permanent()
        );
    }
}
