//! `AgentTask`: one signed intent on its way through the runtime.

// kube's `printcolumn(...)` repeats keys like `type_ = "string"` once per column, which clippy
// mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::intent::{IntentPayload, PrivacyLevel, RequiredResources};
use crate::phase::TaskPhase;

/// Annotation carrying the W3C trace context begun at the edge.
pub const TRACEPARENT_ANNOTATION: &str = "agentplane.dev/traceparent";

/// Desired state of an AgentTask. Everything but `cancel` is fixed at creation; the display copies
/// (`userId`, `intentType`, `privacyLevel`, `requiredResources`) are re-checked against the signed
/// payload on every reconcile, so editing them around the gateway cannot change what runs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentplane.dev",
    version = "v1alpha1",
    kind = "AgentTask",
    namespaced,
    status = "AgentTaskStatus",
    shortname = "atask",
    category = "agentplane",
    doc = "A signed user intent on its way through the agentplane runtime.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Intent", type_ = "string", json_path = ".spec.intentType"),
    printcolumn(name = "Device", type_ = "string", json_path = ".spec.deviceRef.name"),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.model.selected"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "self.envelope == oldSelf.envelope && self.deviceRef == oldSelf.deviceRef && self.userId == oldSelf.userId && self.intentType == oldSelf.intentType && self.privacyLevel == oldSelf.privacyLevel && self.requiredResources == oldSelf.requiredResources"
).message("an AgentTask's envelope and display fields are immutable; only spec.cancel may change"))]
#[x_kube(validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)").message("a cancelled task cannot be un-cancelled"))]
#[serde(rename_all = "camelCase")]
pub struct AgentTaskSpec {
    pub device_ref: DeviceRef,
    /// The DSSE envelope exactly as the device sent it.
    pub envelope: Envelope,
    #[schemars(length(min = 1, max = 253))]
    pub user_id: String,
    #[schemars(length(min = 1, max = 63))]
    pub intent_type: String,
    pub privacy_level: PrivacyLevel,
    #[serde(default)]
    pub required_resources: RequiredResources,
    /// Set to true to cancel the task from any non-terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<bool>,
}

/// The EdgeDevice (same namespace) whose key signed the envelope.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct DeviceRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Observed state of an AgentTask.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.phase) || !(oldSelf.phase in ['Denied', 'Succeeded', 'Failed', 'Cancelled']) || (has(self.phase) && self.phase == oldSelf.phase)"
).message("terminal phases (Denied, Succeeded, Failed, Cancelled) never change"))]
#[serde(rename_all = "camelCase")]
pub struct AgentTaskStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSelection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Why the task was denied, failed or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Index of the last audit-log leaf recorded for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl AgentTaskStatus {
    /// The phase, with an absent phase read as `Pending` (a task nobody has reconciled yet).
    pub fn phase(&self) -> TaskPhase {
        self.phase.unwrap_or_default()
    }
}

/// Which model the device asked for and which the policy chose.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelSelection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<String>,
    /// Position of the selected tier in the policy's ladder (0 = first, the most capable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<u32>,
}

/// Where the task's work item sits in the queue.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default)]
    pub receive_count: u32,
}

/// Tokens used and what they cost, in millionths of the policy's currency unit.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: u64,
}

/// An approver's decision on a task that awaited approval.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    pub decision: ApprovalDecision,
    /// The approver's identity as authenticated by the gateway or the API server.
    #[schemars(length(min = 1, max = 253))]
    pub approver: String,
    pub decided_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalDecision {
    Approved,
    Denied,
}

/// A display field of the spec that disagrees with the signed payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field} is {spec:?} but the signed payload says {signed:?}")]
pub struct DisplayMismatch {
    pub field: &'static str,
    pub spec: String,
    pub signed: String,
}

impl AgentTaskSpec {
    /// Builds the spec for a verified payload: the display copies come from the payload itself.
    pub fn for_payload(envelope: Envelope, payload: &IntentPayload) -> Self {
        AgentTaskSpec {
            device_ref: DeviceRef {
                name: payload.device_id.clone(),
            },
            envelope,
            user_id: payload.user_id.clone(),
            intent_type: payload.intent.kind.clone(),
            privacy_level: payload.privacy_level,
            required_resources: payload.required_resources.clone(),
            cancel: None,
        }
    }

    /// Checks every display copy against the signed payload.
    pub fn check_against(&self, payload: &IntentPayload) -> Result<(), DisplayMismatch> {
        let mismatch =
            |field, spec: &dyn std::fmt::Debug, signed: &dyn std::fmt::Debug| DisplayMismatch {
                field,
                spec: format!("{spec:?}"),
                signed: format!("{signed:?}"),
            };
        if self.device_ref.name != payload.device_id {
            return Err(mismatch(
                "deviceRef.name",
                &self.device_ref.name,
                &payload.device_id,
            ));
        }
        if self.user_id != payload.user_id {
            return Err(mismatch("userId", &self.user_id, &payload.user_id));
        }
        if self.intent_type != payload.intent.kind {
            return Err(mismatch(
                "intentType",
                &self.intent_type,
                &payload.intent.kind,
            ));
        }
        if self.privacy_level != payload.privacy_level {
            return Err(mismatch(
                "privacyLevel",
                &self.privacy_level,
                &payload.privacy_level,
            ));
        }
        if self.required_resources != payload.required_resources {
            return Err(mismatch(
                "requiredResources",
                &self.required_resources,
                &payload.required_resources,
            ));
        }
        Ok(())
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.unwrap_or(false)
    }
}
