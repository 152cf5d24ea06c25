//! `AgentTaskStep`: one journaled step of a task's plan in the distributed runtime.
//!
//! The worker creates the object *before* the step's side effect and finishes it after, so a worker
//! that dies mid-plan resumes at the first unfinished step and never repeats a finished one. One
//! object per step (rather than rows in the task's status) because:
//! - `create` is atomic: two attempts racing to begin the same step cannot both win, and the loser
//!   reads the winner's row;
//! - each object holds one step's replay data (a tool result up to 1 MiB), so a long plan never
//!   pushes one object toward etcd's request limit, and the AgentTask stays small;
//! - the transition rules below make a finished step final at the API server itself, whoever writes;
//! - RBAC can give the workers this resource alone and the gateway nothing.
//!
//! The owner reference to the AgentTask lets the garbage collector remove the steps with the task.

// kube's `printcolumn(...)` repeats keys like `type_ = "string"` once per column, which clippy
// mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::approval::TaskRef;
use crate::task::{StepKind, StepOutcome};

/// The largest tool result or model reply one step object holds (its text, in bytes). A tool result
/// over this is not fed back to the model in the distributed runtime (as a result over the server's
/// `maxResultBytes` is not); etcd refuses requests over 1.5 MiB, which leaves room for the rest.
pub const MAX_STEP_TEXT_BYTES: usize = 1 << 20;

/// The name of step `step` of task `task`: `<task>-step-<step>`. Unambiguous, since the step is the
/// digits after the last `-step-`.
pub fn step_object_name(task: &str, step: u32) -> String {
    format!("{task}-step-{step}")
}

/// One step of a plan: the identity fixed at creation, then how it ended.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentplane.dev",
    version = "v1alpha1",
    kind = "AgentTaskStep",
    namespaced,
    shortname = "astep",
    category = "agentplane",
    doc = "One journaled step (a model turn or a tool call) of an AgentTask's plan; written by the worker before the step runs, final once finished.",
    printcolumn(name = "Task", type_ = "string", json_path = ".spec.taskRef.name"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".spec.step"),
    printcolumn(name = "Kind", type_ = "string", json_path = ".spec.kind"),
    printcolumn(name = "Name", type_ = "string", json_path = ".spec.name"),
    printcolumn(name = "Outcome", type_ = "string", json_path = ".spec.outcome"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "self.taskRef == oldSelf.taskRef && self.step == oldSelf.step && self.kind == oldSelf.kind && self.name == oldSelf.name && self.startedAt == oldSelf.startedAt"
).message("a step's task, index, kind, name and start are fixed at creation"))]
#[x_kube(validation = Rule::new(
    "oldSelf.outcome == 'pending' || (oldSelf.outcome == 'awaitingApproval' && self.outcome != 'pending') || self == oldSelf"
).message("a finished step never changes"))]
#[serde(rename_all = "camelCase")]
pub struct AgentTaskStepSpec {
    /// The AgentTask (same namespace) this step belongs to.
    pub task_ref: TaskRef,
    /// Position in the plan, from 1; with the task it forms the idempotency key.
    #[schemars(range(min = 1, max = 4096))]
    pub step: u32,
    pub kind: StepKind,
    /// The model tier for a model step, `server/tool` for a tool step.
    #[schemars(length(min = 1, max = 200))]
    pub name: String,
    /// The model's id for a tool call, echoed back with its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub call_id: Option<String>,
    /// A tool call's arguments; a finished model step's reply (`{answer}` or `{text, calls}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::task::free_json_object")]
    pub payload: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 71))]
    pub args_digest: Option<String>,
    pub outcome: StepOutcome,
    /// The tool's result text (or why it was refused); a final model step's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1048576))]
    pub result: Option<String>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cost_micros: u64,
    pub started_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
}
