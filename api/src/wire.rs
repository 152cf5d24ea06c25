//! The gateway's HTTP wire types (`/v1/...`), shared by the gateway and the edge agent.
//!
//! Reads are authenticated with a signed request (see [`READ_AUTH_SCHEME`]) rather than a bearer token so
//! an offline device never holds a credential that can expire while it is away; a device whose clock is
//! off learns the server's time from the 401 body and retries with an offset.

use serde::{Deserialize, Serialize};

use crate::device::PublicKey;
use crate::phase::TaskPhase;
use crate::task::{Approval, ModelSelection, Usage};

/// `Authorization: Agentplane-Ed25519 device=<id>,key=<keyid>,ts=<unix seconds>,sig=<base64>`.
pub const READ_AUTH_SCHEME: &str = "Agentplane-Ed25519";

/// How far a signed read's timestamp may be from the gateway's clock.
pub const READ_AUTH_MAX_SKEW_SECS: i64 = 300;

/// The bytes a device signs to read: domain tag, method, path (with query), unix seconds.
pub fn read_auth_message(method: &str, path_and_query: &str, unix_secs: i64) -> Vec<u8> {
    format!("agentplane-read-v1\n{method}\n{path_and_query}\n{unix_secs}").into_bytes()
}

/// Header carrying the W3C trace context from the edge.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Whether `traceparent` has the W3C shape: `version-traceid-spanid-flags` as 2, 32, 16 and 2 lowercase
/// hex digits (version `ff` is invalid; version `00` has exactly these four fields). OpenTelemetry's
/// propagator alone accepts short ids, zero-padding them into a different trace, so every hop checks
/// this first.
pub fn traceparent_is_well_formed(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && (parts[0] != "00" || parts.len() == 4)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// The trace id of a well-formed `traceparent`.
pub fn traceparent_trace_id(traceparent: &str) -> Option<&str> {
    traceparent_is_well_formed(traceparent)
        .then(|| traceparent.split('-').nth(1))
        .flatten()
}

/// `POST /v1/devices/enroll`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    /// One-time join token handed out by the platform operator.
    pub join_token: String,
    /// The device's name (a DNS-1123 label); becomes the EdgeDevice name.
    pub device_id: String,
    pub owner: String,
    pub public_key: PublicKey,
}

/// Answer to an enrollment (201 for a new device, 200 when the same device and key enroll again).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub device_id: String,
    pub namespace: String,
    /// True when this device and key were already enrolled (re-running enroll is harmless).
    pub already_enrolled: bool,
    /// Next sequence number the gateway expects is anything above this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// The namespace policy's rules for the device itself (`AgentPolicy.spec.edge`); absent from
    /// older gateways and when the policy sets none, which the device reads as the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_policy: Option<crate::policy::EdgePolicy>,
}

/// `POST /v1/devices/{id}/keys`: key rotation. The device proves it holds a key the gateway already
/// knows (`signature`, by `signedBy`) and the new one (`proof`), both over [`add_key_message`], so a
/// captured request cannot be replayed with another key and nobody registers a key they do not hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AddKeyRequest {
    /// The key to add (its `notAfter`, if any, is kept).
    pub public_key: PublicKey,
    /// Unix seconds when the device signed; must be within [`READ_AUTH_MAX_SKEW_SECS`] of the gateway.
    pub ts: i64,
    /// Id of the registered key that signed `signature`.
    pub signed_by: String,
    /// base64 Ed25519 signature by `signedBy` over [`add_key_message`].
    pub signature: String,
    /// base64 Ed25519 signature by the new key over [`add_key_message`].
    pub proof: String,
    /// Retire the signing key this many seconds from now (its `notAfter`), so envelopes it signed
    /// while offline still verify for a while. Absent: the old key stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_signing_key_after_secs: Option<u64>,
}

/// Longest grace an old key may be given by [`AddKeyRequest::retire_signing_key_after_secs`].
pub const MAX_RETIRE_AFTER_SECS: u64 = 30 * 24 * 3600;

/// The bytes both keys sign to add a key: domain tag, device, new key id and key, time, retirement.
pub fn add_key_message(
    device_id: &str,
    key: &PublicKey,
    ts: i64,
    retire_after: Option<u64>,
) -> Vec<u8> {
    let retire = retire_after.map_or_else(|| "-".to_owned(), |s| s.to_string());
    format!(
        "agentplane-add-key-v1\n{device_id}\n{}\n{}\n{ts}\n{retire}",
        key.id, key.key
    )
    .into_bytes()
}

/// Answer to `POST /v1/devices/{id}/keys` (201 added, 200 already registered).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AddKeyResponse {
    pub device_id: String,
    /// Every key id now registered, in order.
    pub key_ids: Vec<String>,
    pub already_registered: bool,
}

/// `202 Accepted` answer to `POST /v1/intents` (the body is an [`crate::Envelope`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubmitResponse {
    pub task_id: String,
    pub phase: TaskPhase,
    /// True when this envelope had been accepted before: the existing task is returned, nothing new made.
    pub duplicate: bool,
}

/// `GET /v1/tasks/{id}` and each `phase` event of `GET /v1/tasks/{id}/events`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    pub task_id: String,
    pub device_id: String,
    pub intent_type: String,
    pub phase: TaskPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSelection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Body of `POST /v1/tasks/{id}/approve` and `/deny` (approver credential in `Authorization: Bearer`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The plan step decided on. Absent: the task-level approval. A step the task is not waiting
    /// at is refused (409 `step_mismatch`), so a decision covers only the call the approver saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Digest of the pending call's arguments as the approver saw them (from `GET /v1/approvals`);
    /// a decision whose digest differs from the pending call's is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_digest: Option<String>,
}

/// `GET /v1/approvals` (approver credential): what waits for a decision, oldest first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalList {
    pub pending: Vec<PendingApproval>,
}

/// One task waiting for an approver, with what the approver is asked to allow.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    pub task_id: String,
    pub device_id: String,
    pub user_id: String,
    pub intent_type: String,
    /// The signed prompt (verified by the controller before the task was parked).
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSelection>,
    /// When the task started waiting (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<String>,
    /// The plan step waiting for approval; absent for a task-level approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// The MCP server and tool of the pending call, its arguments and their digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_digest: Option<String>,
}

/// Every non-2xx answer: `{"error": {"code": "...", "message": "...", ...}}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `bad_signature`, `device_revoked`, `replayed_seq`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The gateway's clock (unix seconds) on auth errors, so a device with a wrong clock can correct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time: Option<i64>,
    /// Seconds to wait before retrying (rate limits, overload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_out_of_well_formed_traceparents_only() {
        assert_eq!(
            traceparent_trace_id("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(traceparent_trace_id("00-xyz-b7ad6b7169203331-01"), None);
        assert_eq!(traceparent_trace_id(""), None);
        assert!(!traceparent_is_well_formed(
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!traceparent_is_well_formed(
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"
        ));
    }
}
