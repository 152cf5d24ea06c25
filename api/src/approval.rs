//! `AgentApproval`: one approver's decision on one task, as its own object.
//!
//! Decisions live apart from the task so that who may record one is an RBAC question about this
//! resource alone: the gateway (for an approver it authenticated) and the operator may create them,
//! the workers may not. The controller reads them, re-checks each against the policy and the call
//! that waits, and copies the one it accepts into the task's `status.approval`.

// kube's `printcolumn(...)` repeats keys like `type_ = "string"` once per column, which clippy
// mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::task::Approval;

/// Label on every AgentApproval naming its task, so the decisions of one task are one list away.
pub const TASK_LABEL: &str = "agentplane.dev/task";

/// An approver's decision about one task (and, for a plan, one step of it). Immutable once written.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentplane.dev",
    version = "v1alpha1",
    kind = "AgentApproval",
    namespaced,
    shortname = "aappr",
    category = "agentplane",
    doc = "An approver's decision on an AgentTask awaiting approval; the controller accepts it only if the approver is in the policy's approvers and it is about the call that waits.",
    printcolumn(name = "Task", type_ = "string", json_path = ".spec.taskRef.name"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(name = "Approver", type_ = "string", json_path = ".spec.approver"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".spec.step"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("an AgentApproval is immutable once written"))]
#[serde(rename_all = "camelCase")]
pub struct AgentApprovalSpec {
    /// The AgentTask (same namespace) decided on.
    pub task_ref: TaskRef,
    /// The decision itself, in the same shape as the task's `status.approval` once accepted.
    #[serde(flatten)]
    pub approval: Approval,
}

/// The AgentTask an approval is about.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct TaskRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}
