//! A small gateway client with a device identity: used by the hidden `dev-client` subcommand (the demo's
//! scripted device until the edge agent takes over) and by the integration tests.

use agentplane_api::device::{KeyAlgorithm, PublicKey};
use agentplane_api::envelope::encode_public_key;
use agentplane_api::intent::{Consent, Intent, IntentPayload, PrivacyLevel, RequiredResources};
use agentplane_api::wire::{
    ApprovalList, ApprovalRequest, EnrollRequest, EnrollResponse, ErrorBody, READ_AUTH_SCHEME,
    SubmitResponse, TaskView, read_auth_message,
};
use agentplane_api::{Envelope, EnvelopeError};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey};
use futures::StreamExt as _;
use reqwest::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("gateway answered {status}: {} ({})", body.error.message, body.error.code)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer: {0}")]
    Decode(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("no randomness: {0}")]
    Random(String),
}

/// A device's name and signing key.
pub struct DeviceIdentity {
    pub device_id: String,
    pub key_id: String,
    pub key: SigningKey,
}

impl DeviceIdentity {
    pub fn generate(device_id: &str) -> Result<Self, ClientError> {
        Self::generate_with_key_id(device_id, "k1")
    }

    /// A fresh key under a chosen key id (a rotated key needs an id of its own).
    pub fn generate_with_key_id(device_id: &str, key_id: &str) -> Result<Self, ClientError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| ClientError::Random(e.to_string()))?;
        Ok(DeviceIdentity {
            device_id: device_id.to_owned(),
            key_id: key_id.into(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            id: self.key_id.clone(),
            alg: KeyAlgorithm::Ed25519,
            key: encode_public_key(&self.key.verifying_key()),
            not_after: None,
        }
    }

    /// A payload for this device with a fresh task id.
    pub fn intent(&self, seq: u64, kind: &str, prompt: &str) -> IntentPayload {
        let now = jiff::Timestamp::now();
        IntentPayload {
            v: 1,
            task_id: uuid::Uuid::now_v7().to_string(),
            device_id: self.device_id.clone(),
            user_id: "demo-user".into(),
            seq,
            created_at: now,
            consent: Consent {
                granted_at: now,
                scopes: vec!["model".into()],
            },
            intent: Intent {
                kind: kind.into(),
                prompt: prompt.into(),
                params: Default::default(),
            },
            privacy_level: PrivacyLevel::Public,
            required_resources: RequiredResources::default(),
        }
    }

    pub fn sign(&self, payload: &IntentPayload) -> Result<Envelope, ClientError> {
        Ok(Envelope::sign_intent(payload, &self.key_id, &self.key)?)
    }

    /// Signs raw bytes with the device key (key rotation's signatures).
    pub fn sign_bytes(&self, message: &[u8]) -> ed25519_dalek::Signature {
        use ed25519_dalek::Signer as _;
        self.key.sign(message)
    }

    /// The `Authorization` value for a signed request.
    pub fn read_auth(&self, method: &str, path_and_query: &str, unix_secs: i64) -> String {
        let sig = self
            .key
            .sign(&read_auth_message(method, path_and_query, unix_secs));
        format!(
            "{READ_AUTH_SCHEME} device={},key={},ts={unix_secs},sig={}",
            self.device_id,
            self.key_id,
            B64.encode(sig.to_bytes())
        )
    }
}

pub struct GatewayClient {
    pub base: String,
    pub http: reqwest::Client,
}

async fn decode<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<(StatusCode, T), ClientError> {
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        let body = serde_json::from_slice::<ErrorBody>(&bytes).map_err(|e| {
            ClientError::Decode(format!(
                "{status}: {e}: {}",
                String::from_utf8_lossy(&bytes)
            ))
        })?;
        return Err(ClientError::Api { status, body });
    }
    serde_json::from_slice(&bytes)
        .map(|v| (status, v))
        .map_err(|e| ClientError::Decode(e.to_string()))
}

impl GatewayClient {
    pub fn new(base: &str) -> Self {
        GatewayClient {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn enroll(
        &self,
        join_token: &str,
        device: &DeviceIdentity,
        owner: &str,
    ) -> Result<(StatusCode, EnrollResponse), ClientError> {
        let req = EnrollRequest {
            join_token: join_token.into(),
            device_id: device.device_id.clone(),
            owner: owner.into(),
            public_key: device.public_key(),
        };
        decode(
            self.http
                .post(format!("{}/v1/devices/enroll", self.base))
                .json(&req)
                .send()
                .await?,
        )
        .await
    }

    pub async fn submit(&self, envelope: &Envelope) -> Result<SubmitResponse, ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/intents", self.base))
            .json(envelope)
            .send()
            .await?;
        Ok(decode(resp).await?.1)
    }

    fn signed(
        &self,
        device: &DeviceIdentity,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let auth = device.read_auth(method.as_str(), path, jiff::Timestamp::now().as_second());
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::AUTHORIZATION, auth)
    }

    pub async fn task(&self, device: &DeviceIdentity, id: &str) -> Result<TaskView, ClientError> {
        let resp = self
            .signed(device, reqwest::Method::GET, &format!("/v1/tasks/{id}"))
            .send()
            .await?;
        Ok(decode(resp).await?.1)
    }

    pub async fn cancel(&self, device: &DeviceIdentity, id: &str) -> Result<TaskView, ClientError> {
        let resp = self
            .signed(
                device,
                reqwest::Method::POST,
                &format!("/v1/tasks/{id}/cancel"),
            )
            .send()
            .await?;
        Ok(decode(resp).await?.1)
    }

    /// Follows the task's event stream to its end, calling `on_event` for each view; returns the last.
    pub async fn follow(
        &self,
        device: &DeviceIdentity,
        id: &str,
        mut on_event: impl FnMut(&TaskView),
    ) -> Result<TaskView, ClientError> {
        let resp = self
            .signed(
                device,
                reqwest::Method::GET,
                &format!("/v1/tasks/{id}/events"),
            )
            .send()
            .await?;
        if !resp.status().is_success() {
            return decode::<TaskView>(resp).await.map(|(_, v)| v);
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        let mut last = None;
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
            // Events are separated by a blank line; only `data:` lines of `phase` events matter here.
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                let view: TaskView =
                    serde_json::from_str(&data).map_err(|e| ClientError::Decode(e.to_string()))?;
                on_event(&view);
                last = Some(view);
            }
        }
        last.ok_or_else(|| ClientError::Decode("event stream ended without an event".into()))
    }

    pub async fn decide(
        &self,
        approver_token: &str,
        id: &str,
        approve: bool,
        comment: Option<&str>,
    ) -> Result<TaskView, ClientError> {
        let request = ApprovalRequest {
            comment: comment.map(str::to_owned),
            ..ApprovalRequest::default()
        };
        self.decide_with(approver_token, id, approve, &request)
            .await
    }

    /// Approves or denies with a full request (a step and the arguments' digest).
    pub async fn decide_with(
        &self,
        approver_token: &str,
        id: &str,
        approve: bool,
        request: &ApprovalRequest,
    ) -> Result<TaskView, ClientError> {
        let verb = if approve { "approve" } else { "deny" };
        let resp = self
            .http
            .post(format!("{}/v1/tasks/{id}/{verb}", self.base))
            .bearer_auth(approver_token)
            .json(request)
            .send()
            .await?;
        Ok(decode(resp).await?.1)
    }

    /// `GET /v1/approvals`.
    pub async fn approvals(&self, approver_token: &str) -> Result<ApprovalList, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/approvals", self.base))
            .bearer_auth(approver_token)
            .send()
            .await?;
        Ok(decode(resp).await?.1)
    }
}
