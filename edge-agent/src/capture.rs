//! Capturing an intent: build the payload, sign it with the device key, and store it durably. The caller
//! is acknowledged only after the outbox commit (and its fsync) succeeded.

use std::path::PathBuf;
use std::sync::Arc;

use agentplane_api::envelope::{EnvelopeSignature, INTENT_PAYLOAD_TYPE, pae};
use agentplane_api::policy::RegulatedRoute;
use agentplane_api::{Consent, Envelope, Intent, IntentPayload, PrivacyLevel, RequiredResources};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::config::AgentState;
use crate::identity::DeviceSigner;
use crate::outbox::{EntryState, NewEntry, Outbox, OutboxError, RunsOn};
use crate::telemetry;

/// Largest prompt accepted from the UI or the command line (the payload limit is larger; this keeps
/// the outbox small on a Pi).
pub const MAX_PROMPT_CHARS: usize = 64 * 1024;

/// What the user asked for, as the UI or the CLI sends it.
#[derive(Deserialize, Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct IntentRequest {
    #[serde(rename = "type")]
    pub kind: String,
    pub prompt: String,
    #[serde(default = "default_privacy")]
    pub privacy_level: PrivacyLevel,
    /// Defaults to the agent's configured user.
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// GPUs the task needs; `true`/`false` from older UIs read as 1/0.
    #[serde(
        default,
        deserialize_with = "agentplane_api::intent::deserialize_gpu_count"
    )]
    pub gpu: u32,
    #[serde(default)]
    pub model: Option<String>,
    /// Consent scopes the user granted with this intent.
    #[serde(default = "default_scopes")]
    pub consent_scopes: Vec<String>,
}

fn default_privacy() -> PrivacyLevel {
    PrivacyLevel::Public
}

fn default_scopes() -> Vec<String> {
    vec!["process".to_owned()]
}

/// The local policy applied before anything leaves the device.
#[derive(Clone, Debug, Default)]
pub struct LocalPolicy {
    /// Lets `private` intents leave the device when no local model is configured.
    pub allow_private_upload: bool,
    /// A local model is configured (`--local-model`): `private` intents run on it.
    pub local_model: bool,
    /// Where `regulated` intents go when `state_file` is not set.
    pub regulated: RegulatedRoute,
    /// The agent state file holding the edge policy of the last enrollment; read at each regulated
    /// capture, so re-running `enroll` applies a changed policy without restarting the agent.
    pub state_file: Option<PathBuf>,
}

impl LocalPolicy {
    pub fn may_upload(&self, privacy: PrivacyLevel) -> bool {
        privacy != PrivacyLevel::Private || self.allow_private_upload
    }

    /// Where an intent of this privacy level runs, or why it is refused on the device.
    pub fn route(&self, privacy: PrivacyLevel) -> Result<RunsOn, CaptureError> {
        match privacy {
            PrivacyLevel::Public => Ok(RunsOn::Cloud),
            PrivacyLevel::Private if self.local_model => Ok(RunsOn::Device),
            PrivacyLevel::Private if self.allow_private_upload => Ok(RunsOn::Cloud),
            PrivacyLevel::Private => Err(CaptureError::PrivateStaysLocal),
            PrivacyLevel::Regulated => match self.regulated_route()? {
                RegulatedRoute::Cloud => Ok(RunsOn::Cloud),
                RegulatedRoute::Local if self.local_model => Ok(RunsOn::Device),
                RegulatedRoute::Local => Err(CaptureError::RegulatedStaysLocal),
                RegulatedRoute::Refuse => Err(CaptureError::RegulatedRefused),
            },
        }
    }

    fn regulated_route(&self) -> Result<RegulatedRoute, CaptureError> {
        let Some(path) = &self.state_file else {
            return Ok(self.regulated);
        };
        let state = AgentState::load(path).map_err(|e| CaptureError::Policy(e.to_string()))?;
        Ok(state.edge_policy.map(|p| p.regulated).unwrap_or_default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "this intent is marked private: it may only run on this device, and no local model is configured (run the agent with --local-model URL). Nothing was stored or sent"
    )]
    PrivateStaysLocal,
    #[error(
        "the platform's policy runs regulated intents on this device, and no local model is configured (run the agent with --local-model URL). Nothing was stored or sent"
    )]
    RegulatedStaysLocal,
    #[error(
        "the platform's policy refuses regulated intents on this device. Nothing was stored or sent"
    )]
    RegulatedRefused,
    #[error("cannot read the device's policy: {0}")]
    Policy(String),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

impl CaptureError {
    pub fn code(&self) -> &'static str {
        match self {
            CaptureError::Invalid(_) => "invalid_intent",
            CaptureError::PrivateStaysLocal => "private_stays_local",
            CaptureError::RegulatedStaysLocal => "regulated_stays_local",
            CaptureError::RegulatedRefused => "regulated_refused",
            CaptureError::Policy(_) => "policy_error",
            CaptureError::Outbox(OutboxError::Full { .. }) => "outbox_full",
            CaptureError::Outbox(OutboxError::DiskFull) => "disk_full",
            CaptureError::Outbox(OutboxError::Corrupt { .. }) => "outbox_corrupt",
            CaptureError::Outbox(_) => "outbox_error",
        }
    }
}

/// An accepted (durable) intent.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub task_id: String,
    pub seq: u64,
    pub runs_on: RunsOn,
}

/// Everything needed to turn a request into a signed, stored intent.
#[derive(Clone)]
pub struct Capturer {
    pub outbox: Outbox,
    pub signer: Arc<dyn DeviceSigner>,
    pub device_id: String,
    pub default_user: String,
    pub policy: LocalPolicy,
}

impl Capturer {
    pub async fn capture(&self, req: IntentRequest) -> Result<Accepted, CaptureError> {
        let runs_on = self.policy.route(req.privacy_level)?;
        if req.prompt.trim().is_empty() {
            return Err(CaptureError::Invalid("the prompt is empty".into()));
        }
        if req.prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(CaptureError::Invalid(format!(
                "the prompt is longer than {MAX_PROMPT_CHARS} characters"
            )));
        }
        let user_id = req
            .user_id
            .clone()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| self.default_user.clone());
        let task_id = uuid::Uuid::now_v7().to_string();
        // The consent is granted by the act of submitting; its timestamp is the device's clock.
        let now = jiff::Timestamp::now();
        let mut payload = IntentPayload {
            v: agentplane_api::intent::PAYLOAD_VERSION,
            task_id: task_id.clone(),
            device_id: self.device_id.clone(),
            user_id,
            seq: 1,
            created_at: now,
            consent: Consent {
                granted_at: now,
                scopes: req.consent_scopes,
            },
            intent: Intent {
                kind: req.kind,
                prompt: req.prompt,
                params: req.params,
            },
            privacy_level: req.privacy_level,
            required_resources: RequiredResources {
                gpu: req.gpu,
                model: req.model.filter(|m| !m.is_empty()),
            },
        };
        // Validate before taking a sequence number so a bad request costs nothing.
        payload
            .validate()
            .map_err(|e| CaptureError::Invalid(e.to_string()))?;
        let signer = self.signer.clone();
        // The user's action starts the task's trace: a root span whose context is kept with the entry,
        // so every send of it, after a restart too, continues this trace.
        let span = tracing::info_span!(
            parent: None,
            "edge.capture",
            task_id = %task_id,
            intent = %payload.intent.kind,
        );
        let traceparent = match telemetry::traceparent_of(&span) {
            Some(tp) => tp,
            None => new_traceparent()?,
        };
        let (seq, task_id) = self
            .outbox
            .insert(move |seq| {
                payload.seq = seq;
                let envelope = sign(&payload, signer.as_ref())?;
                Ok(NewEntry {
                    task_id: payload.task_id.clone(),
                    envelope,
                    traceparent,
                    intent_type: payload.intent.kind.clone(),
                    prompt: payload.intent.prompt.clone(),
                    privacy: payload.privacy_level.as_str().to_owned(),
                    created_at: payload.created_at.to_string(),
                    // A device intent is signed like any other (one code path, and the record is
                    // attributable) but never queued for the gateway.
                    state: match runs_on {
                        RunsOn::Device => EntryState::Local,
                        RunsOn::Cloud => EntryState::Pending,
                    },
                    runs_on,
                })
            })
            .instrument(span)
            .await?;
        tracing::debug!(%task_id, seq, runs_on = runs_on.as_str(), "intent captured");
        Ok(Accepted {
            task_id,
            seq,
            runs_on,
        })
    }
}

/// Signs the payload into a DSSE envelope (JSON text), through the signer so that a key that never leaves
/// a TPM works the same way.
pub fn sign(payload: &IntentPayload, signer: &dyn DeviceSigner) -> Result<String, OutboxError> {
    let bytes = serde_json::to_vec(payload).map_err(|e| OutboxError::Build(e.to_string()))?;
    let sig = signer
        .sign(&pae(INTENT_PAYLOAD_TYPE, &bytes))
        .map_err(|e| OutboxError::Build(e.to_string()))?;
    let envelope = Envelope {
        payload_type: INTENT_PAYLOAD_TYPE.to_owned(),
        payload: B64.encode(&bytes),
        signatures: vec![EnvelopeSignature {
            keyid: signer.key_id().to_owned(),
            sig: B64.encode(sig.to_bytes()),
        }],
    };
    serde_json::to_string(&envelope).map_err(|e| OutboxError::Build(e.to_string()))
}

/// A W3C trace context begun at the edge (sampled), kept with the entry so every resend carries it.
pub fn new_traceparent() -> Result<String, OutboxError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| OutboxError::Build(format!("no randomness: {e}")))?;
    // All-zero ids are invalid in W3C trace context.
    bytes[0] |= 1;
    bytes[16] |= 1;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok(format!("00-{}-{}-01", hex(&bytes[..16]), hex(&bytes[16..])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SoftKey;
    use crate::outbox::OutboxConfig;
    use agentplane_api::envelope::DeviceKey;

    fn capturer(dir: &std::path::Path) -> (Capturer, Arc<SoftKey>) {
        let key = Arc::new(SoftKey::generate().unwrap());
        let c = Capturer {
            outbox: Outbox::open(OutboxConfig::new(dir.join("o.db"))).unwrap(),
            signer: key.clone(),
            device_id: "kiosk-1".into(),
            default_user: "alice".into(),
            policy: LocalPolicy::default(),
        };
        (c, key)
    }

    fn req(privacy: PrivacyLevel) -> IntentRequest {
        serde_json::from_value(serde_json::json!({
            "type": "summarize", "prompt": "hello", "privacyLevel": privacy.as_str()
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn captured_intent_is_signed_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (c, key) = capturer(dir.path());
        let a = c.capture(req(PrivacyLevel::Public)).await.unwrap();
        assert_eq!(a.seq, 1);
        let e = c.outbox.get(&a.task_id).await.unwrap().unwrap();
        let env = Envelope::parse(e.envelope.as_bytes()).unwrap();
        let keys = [DeviceKey {
            id: key.key_id().into(),
            key: key.public_key(),
            not_after: None,
        }];
        let v = env
            .verify("kiosk-1", &keys, jiff::Timestamp::now())
            .unwrap();
        assert_eq!(v.payload.seq, 1);
        assert_eq!(v.payload.task_id, a.task_id);
        assert_eq!(v.payload.user_id, "alice");
        assert!(e.traceparent.starts_with("00-") && e.traceparent.len() == 55);
        let b = c.capture(req(PrivacyLevel::Regulated)).await.unwrap();
        assert_eq!(b.seq, 2);
    }

    #[tokio::test]
    async fn private_intents_stay_local_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = capturer(dir.path());
        let err = c.capture(req(PrivacyLevel::Private)).await.unwrap_err();
        assert_eq!(err.code(), "private_stays_local");
        assert_eq!(c.outbox.counts().await.unwrap().pending, 0);
        c.policy.allow_private_upload = true;
        c.capture(req(PrivacyLevel::Private)).await.unwrap();
    }

    #[test]
    fn routes_follow_privacy_local_model_and_the_enrollment_policy() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("agent.json");
        let mut p = LocalPolicy {
            state_file: Some(state_file.clone()),
            ..LocalPolicy::default()
        };
        // No local model: private is refused, regulated defaults to the cloud.
        assert_eq!(p.route(PrivacyLevel::Public).unwrap(), RunsOn::Cloud);
        assert_eq!(
            p.route(PrivacyLevel::Private).unwrap_err().code(),
            "private_stays_local"
        );
        assert_eq!(p.route(PrivacyLevel::Regulated).unwrap(), RunsOn::Cloud);
        p.local_model = true;
        assert_eq!(p.route(PrivacyLevel::Private).unwrap(), RunsOn::Device);
        // The policy is read from the state file at each capture: a re-enrollment applies at once.
        for (route, want) in [
            ("local", Ok(RunsOn::Device)),
            ("cloud", Ok(RunsOn::Cloud)),
            ("refuse", Err("regulated_refused")),
        ] {
            std::fs::write(
                &state_file,
                format!(r#"{{"edgePolicy": {{"regulated": "{route}"}}}}"#),
            )
            .unwrap();
            let got = p.route(PrivacyLevel::Regulated).map_err(|e| e.code());
            assert_eq!(got, want, "{route}");
        }
        std::fs::write(&state_file, r#"{"edgePolicy": {"regulated": "local"}}"#).unwrap();
        p.local_model = false;
        assert_eq!(
            p.route(PrivacyLevel::Regulated).unwrap_err().code(),
            "regulated_stays_local"
        );
        std::fs::write(&state_file, "{nope").unwrap();
        assert_eq!(
            p.route(PrivacyLevel::Regulated).unwrap_err().code(),
            "policy_error"
        );
    }

    #[tokio::test]
    async fn device_intents_are_stored_for_the_local_model_not_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = capturer(dir.path());
        c.policy.local_model = true;
        let a = c.capture(req(PrivacyLevel::Private)).await.unwrap();
        assert_eq!(a.runs_on, RunsOn::Device);
        let e = c.outbox.get(&a.task_id).await.unwrap().unwrap();
        assert_eq!((e.state, e.runs_on), (EntryState::Local, RunsOn::Device));
        assert!(c.outbox.pending(10).await.unwrap().is_empty());
        assert_eq!(c.outbox.local_queue(10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_without_using_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = capturer(dir.path());
        let mut r = req(PrivacyLevel::Public);
        r.kind = "has space".into();
        assert_eq!(c.capture(r).await.unwrap_err().code(), "invalid_intent");
        let mut r = req(PrivacyLevel::Public);
        r.prompt = "  ".into();
        assert_eq!(c.capture(r).await.unwrap_err().code(), "invalid_intent");
        assert_eq!(c.capture(req(PrivacyLevel::Public)).await.unwrap().seq, 1);
    }
}
