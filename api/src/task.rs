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
    /// The plan as run so far: one entry per model call and per tool call, in order. Journaled before
    /// each step's side effect, so a worker that dies mid-plan resumes at the first unfinished step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["index".into()]))]
    pub steps: Vec<PlanStep>,
    /// The tool call a plan is waiting on an approver for (set with phase AwaitingApproval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_approval: Option<PendingApproval>,
    /// The AgentPolicy's Rego modules' verdict at admission (absent when the policy has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<crate::policy::RegoVerdict>,
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
    /// The gateway keeps at most 1024 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,
    /// The plan step decided on; absent for the task-level approval an intent rule asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// `argsDigest` of the pending call decided on: an approval covers those exact arguments only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    pub args_digest: Option<String>,
}

impl Approval {
    /// Whether this decision is about `pending` (same step, same arguments).
    pub fn covers(&self, pending: &PendingApproval) -> bool {
        self.step == Some(pending.step) && self.args_digest.as_deref() == Some(&pending.args_digest)
    }
}

/// One step of a task's plan.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanStep {
    /// Position in the plan, from 1. With the task id it forms the step's idempotency key.
    pub index: u32,
    pub kind: StepKind,
    /// The model tier for a model step, `server/tool` for a tool step.
    #[schemars(length(min = 1, max = 200))]
    pub name: String,
    /// `sha256:<hex>` of the tool call's canonical arguments (keys sorted, no whitespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    pub args_digest: Option<String>,
    pub outcome: StepOutcome,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cost_micros: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Why the step failed or was denied (never a secret, never the tool's full output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Model,
    Tool,
}

/// Where one step is. `pending` means journaled as started, side effect not yet known to be done.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum StepOutcome {
    Pending,
    Done,
    Failed,
    Denied,
    AwaitingApproval,
}

impl StepOutcome {
    /// Whether the step's result is final (a resume never runs it again).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            StepOutcome::Done | StepOutcome::Failed | StepOutcome::Denied
        )
    }
}

/// What an approver is asked to decide: one tool call with its exact arguments.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingApproval {
    pub step: u32,
    #[schemars(length(min = 1, max = 32))]
    pub server: String,
    #[schemars(length(min = 1, max = 128))]
    pub tool: String,
    /// The call's arguments as the model produced them (free JSON).
    #[schemars(schema_with = "free_json_object")]
    pub arguments: serde_json::Map<String, serde_json::Value>,
    #[schemars(length(max = 71))]
    pub args_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Time>,
}

/// Rebuilds objects with their keys inserted in sorted order, so the bytes do not depend on whether
/// some crate in the build turned on serde_json's `preserve_order`.
fn canonical_object(
    map: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    keys.into_iter()
        .map(|k| (k.clone(), canonical(&map[k])))
        .collect()
}

fn canonical(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(m) => serde_json::Value::Object(canonical_object(m)),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A JSON object of any shape, kept verbatim by the API server.
pub(crate) fn free_json_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// `sha256:<hex>` of a JSON value in canonical form (object keys sorted, no insignificant whitespace):
/// two calls with the same arguments in any key order share a digest.
pub fn args_digest(arguments: &serde_json::Map<String, serde_json::Value>) -> String {
    use sha2::Digest as _;
    let canonical =
        serde_json::to_vec(&canonical_object(arguments)).expect("a JSON value always serialises");
    let digest = sha2::Sha256::digest(&canonical);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn args_digest_ignores_key_order_but_not_values() {
        let a = obj(json!({"path": "/tmp/x", "opts": {"force": true, "depth": 2}}));
        let b = obj(json!({"opts": {"depth": 2, "force": true}, "path": "/tmp/x"}));
        let c = obj(json!({"path": "/tmp/y", "opts": {"force": true, "depth": 2}}));
        assert_eq!(args_digest(&a), args_digest(&b));
        assert_ne!(args_digest(&a), args_digest(&c));
        assert!(args_digest(&a).starts_with("sha256:"));
        assert_eq!(args_digest(&a).len(), 71);
    }

    #[test]
    fn an_approval_covers_one_step_and_its_exact_arguments() {
        let args = obj(json!({"id": 7}));
        let pending = PendingApproval {
            step: 3,
            server: "files".into(),
            tool: "delete".into(),
            args_digest: args_digest(&args),
            arguments: args,
            requested_at: None,
        };
        let approval = |step, digest: &str| Approval {
            decision: ApprovalDecision::Approved,
            approver: "admin".into(),
            decided_at: Time(jiff::Timestamp::UNIX_EPOCH),
            comment: None,
            step,
            args_digest: Some(digest.to_owned()),
        };
        assert!(approval(Some(3), &pending.args_digest).covers(&pending));
        assert!(!approval(Some(2), &pending.args_digest).covers(&pending));
        assert!(!approval(Some(3), &args_digest(&obj(json!({"id": 8})))).covers(&pending));
        assert!(!approval(None, &pending.args_digest).covers(&pending));
    }

    #[test]
    fn steps_use_the_documented_wire_names() {
        let step = PlanStep {
            index: 1,
            kind: StepKind::Tool,
            name: "files/delete".into(),
            args_digest: None,
            outcome: StepOutcome::AwaitingApproval,
            input_tokens: 0,
            output_tokens: 0,
            cost_micros: 0,
            started_at: None,
            finished_at: None,
            error: None,
        };
        let v = serde_json::to_value(&step).unwrap();
        assert_eq!(v["kind"], "tool");
        assert_eq!(v["outcome"], "awaitingApproval");
        assert_eq!(v["costMicros"], 0);
    }
}
