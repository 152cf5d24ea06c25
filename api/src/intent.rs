//! The intent payload: what a device signs. Its JSON bytes travel inside the DSSE envelope verbatim.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Version of the payload layout this crate reads and writes.
pub const PAYLOAD_VERSION: u32 = 1;

/// Longest task id: the task id becomes the AgentTask's object name, so it must be a DNS-1123 label.
pub const MAX_TASK_ID_LEN: usize = 63;

/// Longest prompt accepted inside a payload (the whole payload is also bounded, see `envelope`).
pub const MAX_PROMPT_BYTES: usize = 256 * 1024;

/// How sensitive an intent is; the policy decides which tiers may see each level.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyLevel {
    /// Must not leave infrastructure the owner controls.
    Private,
    /// May be processed centrally under regulation (e.g. no third-party retention).
    Regulated,
    /// No restriction.
    Public,
}

impl PrivacyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            PrivacyLevel::Private => "private",
            PrivacyLevel::Regulated => "regulated",
            PrivacyLevel::Public => "public",
        }
    }
}

impl std::fmt::Display for PrivacyLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The user's consent that travels with the intent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Consent {
    pub granted_at: Timestamp,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// What the user asked for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Intent {
    #[serde(rename = "type")]
    pub kind: String,
    pub prompt: String,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// Most GPUs one task may ask for (the largest common node has 8; 16 leaves room without letting a
/// typo ask for thousands).
pub const MAX_GPUS: u32 = 16;

/// What the task needs from the runtime.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RequiredResources {
    /// How many GPUs the task needs (0: none). A GPU task runs on a GPU-backed model tier and, in a
    /// cluster, as a Job on the GPU pool with this many `nvidia.com/gpu`. Payload version 1 first
    /// carried a boolean here; `true` still reads as 1 and `false` as 0, so envelopes signed before
    /// the change (queued offline on devices) verify and parse unchanged.
    #[serde(default, deserialize_with = "deserialize_gpu_count")]
    #[schemars(range(max = 16))]
    pub gpu: u32,
    /// The model tier the device asks for; the policy may move it down the ladder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl RequiredResources {
    pub fn needs_gpu(&self) -> bool {
        self.gpu > 0
    }
}

/// Reads a GPU count, or the boolean earlier payloads carried (`true` = 1, `false` = 0). A negative
/// or fractional number, or a count beyond `u32`, is an error naming what was expected.
pub fn deserialize_gpu_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct GpuCount;
    impl serde::de::Visitor<'_> for GpuCount {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a GPU count (a non-negative integer) or a boolean (true = 1 GPU)")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<u32, E> {
            Ok(u32::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::custom(format!("GPU count {v} is too large")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("GPU count {v} is negative")))
                .and_then(|v| self.visit_u64(v))
        }
    }
    d.deserialize_any(GpuCount)
}

/// The signed payload of an intent (`application/vnd.agentplane.intent.v1+json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntentPayload {
    pub v: u32,
    pub task_id: String,
    pub device_id: String,
    pub user_id: String,
    /// Per-device monotonic sequence number; with the task id it is the replay guard.
    pub seq: u64,
    pub created_at: Timestamp,
    pub consent: Consent,
    pub intent: Intent,
    pub privacy_level: PrivacyLevel,
    #[serde(default)]
    pub required_resources: RequiredResources,
}

/// A payload field that parsed but breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload field `{field}` is invalid: {reason}")]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

impl IntentPayload {
    /// Checks the rules serde cannot express. Called by the envelope after decoding.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.v != PAYLOAD_VERSION {
            return Err(invalid(
                "v",
                format!(
                    "unsupported payload version {}, expected {PAYLOAD_VERSION}",
                    self.v
                ),
            ));
        }
        check_dns_label("taskId", &self.task_id)?;
        check_dns_label("deviceId", &self.device_id)?;
        if self.user_id.trim().is_empty() {
            return Err(invalid("userId", "must not be empty"));
        }
        if self.user_id.len() > 253 {
            return Err(invalid("userId", "longer than 253 bytes"));
        }
        if self.intent.kind.is_empty() || self.intent.kind.len() > 63 {
            return Err(invalid("intent.type", "must be 1 to 63 bytes"));
        }
        if !self
            .intent
            .kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "intent.type",
                "may hold only ASCII letters, digits, '-', '_' and '.'",
            ));
        }
        if self.required_resources.gpu > MAX_GPUS {
            return Err(invalid(
                "requiredResources.gpu",
                format!(
                    "asks for {} GPUs; at most {MAX_GPUS}",
                    self.required_resources.gpu
                ),
            ));
        }
        if self.intent.prompt.len() > MAX_PROMPT_BYTES {
            return Err(invalid(
                "intent.prompt",
                format!("longer than {MAX_PROMPT_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidField {
    InvalidField {
        field,
        reason: reason.into(),
    }
}

/// Kubernetes object names for our kinds are DNS-1123 labels: the task id and device id become names.
pub fn check_dns_label(field: &'static str, value: &str) -> Result<(), InvalidField> {
    if value.is_empty() || value.len() > MAX_TASK_ID_LEN {
        return Err(invalid(
            field,
            format!("must be 1 to {MAX_TASK_ID_LEN} characters"),
        ));
    }
    let bytes = value.as_bytes();
    let ok_inner = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ok_ends =
        bytes[0].is_ascii_alphanumeric() && bytes[bytes.len() - 1].is_ascii_alphanumeric();
    if !ok_inner || !ok_ends {
        return Err(invalid(
            field,
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> IntentPayload {
        IntentPayload {
            v: 1,
            task_id: "0190f7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b".into(),
            device_id: "kiosk-1".into(),
            user_id: "alice".into(),
            seq: 1,
            created_at: "2026-11-24T08:00:00Z".parse().unwrap(),
            consent: Consent {
                granted_at: "2026-11-24T07:59:00Z".parse().unwrap(),
                scopes: vec!["model".into()],
            },
            intent: Intent {
                kind: "summarize".into(),
                prompt: "hello".into(),
                params: Default::default(),
            },
            privacy_level: PrivacyLevel::Public,
            required_resources: RequiredResources::default(),
        }
    }

    #[test]
    fn json_field_names_follow_the_contract() {
        let v = serde_json::to_value(sample()).unwrap();
        for key in [
            "v",
            "taskId",
            "deviceId",
            "userId",
            "seq",
            "createdAt",
            "consent",
            "intent",
            "privacyLevel",
            "requiredResources",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["intent"]["type"], "summarize");
        assert_eq!(v["consent"]["grantedAt"], "2026-11-24T07:59:00Z");
        assert_eq!(v["privacyLevel"], "public");
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = sample();
        p.task_id = "Not_A_Label".into();
        assert_eq!(p.validate().unwrap_err().field, "taskId");
        let mut p = sample();
        p.v = 2;
        assert_eq!(p.validate().unwrap_err().field, "v");
        let mut p = sample();
        p.intent.kind = "has space".into();
        assert_eq!(p.validate().unwrap_err().field, "intent.type");
        assert!(sample().validate().is_ok());
    }

    #[test]
    fn gpu_is_a_count_and_the_old_boolean_still_reads() {
        let with = |gpu: serde_json::Value| {
            let mut v = serde_json::to_value(sample()).unwrap();
            v["requiredResources"]["gpu"] = gpu;
            serde_json::from_value::<IntentPayload>(v).map(|p| p.required_resources.gpu)
        };
        assert_eq!(with(serde_json::json!(true)).unwrap(), 1);
        assert_eq!(with(serde_json::json!(false)).unwrap(), 0);
        assert_eq!(with(serde_json::json!(4)).unwrap(), 4);
        let negative = with(serde_json::json!(-1)).unwrap_err().to_string();
        assert!(negative.contains("negative"), "{negative}");
        let fraction = with(serde_json::json!(1.5)).unwrap_err().to_string();
        assert!(fraction.contains("GPU count"), "{fraction}");
        assert!(with(serde_json::json!("2")).is_err());
        // Absent: no GPU. Written back as a number.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["requiredResources"] = serde_json::json!({});
        let p: IntentPayload = serde_json::from_value(v).unwrap();
        assert_eq!(p.required_resources.gpu, 0);
        let mut p = sample();
        p.required_resources.gpu = 2;
        assert_eq!(
            serde_json::to_value(&p).unwrap()["requiredResources"]["gpu"],
            2
        );
        p.required_resources.gpu = MAX_GPUS + 1;
        assert_eq!(p.validate().unwrap_err().field, "requiredResources.gpu");
    }

    #[test]
    fn dns_labels() {
        assert!(check_dns_label("x", "a").is_ok());
        assert!(check_dns_label("x", "a-1").is_ok());
        assert!(check_dns_label("x", "-a").is_err());
        assert!(check_dns_label("x", "a-").is_err());
        assert!(check_dns_label("x", "").is_err());
        assert!(check_dns_label("x", &"a".repeat(64)).is_err());
    }
}
