//! `EdgeDevice`: a registered device, its public keys and whether it may still submit.

// kube's `printcolumn(...)` repeats keys like `type_ = "string"` once per column, which clippy
// mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::envelope::{DeviceKey, EnvelopeError, parse_public_key};

/// Most keys one device holds at once (rotation keeps the old key until its `notAfter`).
pub const MAX_DEVICE_KEYS: usize = 16;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentplane.dev",
    version = "v1alpha1",
    kind = "EdgeDevice",
    namespaced,
    status = "EdgeDeviceStatus",
    shortname = "edev",
    category = "agentplane",
    doc = "A device allowed to submit signed intents, with its registered public keys.",
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(name = "Revoked", type_ = "boolean", json_path = ".spec.revoked"),
    printcolumn(name = "Last-Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceSpec {
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(k, self.exists_one(j, j.id == k.id))").message("public key ids must be unique"))]
    pub public_keys: Vec<PublicKey>,
    #[schemars(length(min = 1, max = 253))]
    pub owner: String,
    /// Intent types this device may submit; empty means whatever the policy allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_intents: Vec<String>,
    /// A revoked device's envelopes are refused, including tasks it submitted before revocation that
    /// have not been admitted yet.
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PublicKey {
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    pub alg: KeyAlgorithm,
    /// Standard base64 of the raw 32-byte Ed25519 public key.
    #[schemars(length(min = 44, max = 44))]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    Ed25519,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(oldSelf.lastSeq) || (has(self.lastSeq) && self.lastSeq >= oldSelf.lastSeq)").message("lastSeq never goes backwards (it is the replay guard)"))]
#[serde(rename_all = "camelCase")]
pub struct EdgeDeviceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Highest intent sequence number admitted from this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Which of the 64 sequence numbers ending at `lastSeq` (`SEQ_WINDOW`) were admitted: 16 hex
    /// digits of a 64-bit map, bit `i` standing for `lastSeq - i` (the anti-replay window of IPsec and
    /// DTLS). Absent on a device that has `lastSeq` means every seq up to `lastSeq` counts as taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{16}$"))]
    pub seq_window: Option<String>,
}

/// How far below a device's `lastSeq` a new intent may still arrive: a device may have this many
/// submissions in flight, so they can reach the gateway out of order. Anything at or below
/// `lastSeq - SEQ_WINDOW` is refused as a replay.
pub const SEQ_WINDOW: u64 = 64;

impl EdgeDeviceSpec {
    /// The device's keys in the form envelope verification takes. A malformed registered key is an
    /// error, not a silently skipped key, so an operator sees it.
    pub fn device_keys(&self) -> Result<Vec<DeviceKey>, EnvelopeError> {
        self.public_keys
            .iter()
            .map(|k| {
                Ok(DeviceKey {
                    id: k.id.clone(),
                    key: parse_public_key(&k.id, &k.key)?,
                    not_after: k.not_after.as_ref().map(|t| t.0),
                })
            })
            .collect()
    }

    /// Whether the device may submit this intent type (the policy decides the rest).
    pub fn allows_intent(&self, intent_type: &str) -> bool {
        self.allowed_intents.is_empty() || self.allowed_intents.iter().any(|i| i == intent_type)
    }
}
