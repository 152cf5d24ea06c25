//! `AgentPolicy`: what a namespace's tasks may do, how fast, on which model tiers, for how much.

// kube's `printcolumn(...)` repeats keys like `type_ = "string"` once per column, which clippy
// mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::intent::PrivacyLevel;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "agentplane.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    namespaced,
    shortname = "apol",
    category = "agentplane",
    doc = "Admission, privacy, rate-limit, budget and model-tier rules for the AgentTasks of a namespace.",
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicySpec {
    /// The kill switch: no new task is admitted or taken off the queue while set.
    #[serde(default)]
    pub suspend: bool,
    /// Per-intent rules, one per intent type.
    #[serde(default)]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub intents: Vec<IntentRule>,
    /// What happens to intent types no rule names.
    #[serde(default)]
    pub unlisted_intents: UnlistedIntents,
    /// The model tier ladder, most capable (and expensive) first.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub models: Vec<ModelTier>,
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub budgets: Vec<Budget>,
    /// Identities allowed to approve or deny tasks that require approval.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub approvers: Vec<String>,
}

#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum UnlistedIntents {
    #[default]
    Deny,
    Allow,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IntentRule {
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    #[serde(default = "yes")]
    pub allowed: bool,
    #[serde(default)]
    pub requires_approval: bool,
    /// Privacy levels this intent may be submitted with; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub privacy_levels: Vec<PrivacyLevel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub rate_limits: Vec<RateLimit>,
    #[serde(default)]
    pub on_rate_limit: RateLimitAction,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.requests > 0 && self.periodSeconds > 0 && self.periodSeconds <= 2678400").message("a rate limit needs requests > 0 and a period of 1 s to 31 days"))]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub scope: Scope,
    pub requests: u32,
    pub period_seconds: u32,
}

#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RateLimitAction {
    /// Deny with a reason and a retry-after.
    #[default]
    Deny,
    /// Keep the task Pending until the window has room.
    Hold,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    User,
    Device,
    Namespace,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.endpointKind == 'builtin' || self.endpoint.startsWith('https://') || self.endpoint.startsWith('http://127.0.0.1') || self.endpoint.startsWith('http://localhost')").message("remote model endpoints must use https"))]
#[serde(rename_all = "camelCase")]
pub struct ModelTier {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    pub endpoint_kind: EndpointKind,
    /// Base URL of the endpoint (`builtin:` models take a name here, e.g. `builtin:echo`).
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: String,
    /// Model name sent to the endpoint; defaults to the tier name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Price per 1,000 input tokens, in millionths of the currency unit.
    #[serde(default)]
    pub price_per_1k_input_micros: u64,
    /// Price per 1,000 output tokens, in millionths of the currency unit.
    #[serde(default)]
    pub price_per_1k_output_micros: u64,
    /// Privacy levels this tier may serve; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub privacy_levels: Vec<PrivacyLevel>,
    #[serde(default)]
    pub gpu: bool,
    /// Secret holding the endpoint's API key (envelope-encrypted with KMS in the distributed runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    Builtin,
    Openai,
    Anthropic,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.limitMicros >= 0").message("budget limits must not be negative"))]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub scope: Scope,
    /// Spend allowed per period, in millionths of the currency unit.
    pub limit_micros: i64,
    pub period: BudgetPeriod,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetPeriod {
    Hour,
    Day,
    Week,
    Month,
}

impl AgentPolicySpec {
    /// The rule for an intent type, if any.
    pub fn rule_for(&self, intent_type: &str) -> Option<&IntentRule> {
        self.intents.iter().find(|r| r.kind == intent_type)
    }

    /// The tier named `name` and its position on the ladder.
    pub fn tier(&self, name: &str) -> Option<(usize, &ModelTier)> {
        self.models.iter().enumerate().find(|(_, m)| m.name == name)
    }
}

impl ModelTier {
    /// Cost of a call, rounded up so that many small calls cannot add up to free usage.
    pub fn cost_micros(&self, input_tokens: u64, output_tokens: u64) -> u64 {
        let cost = |tokens: u64, per_1k: u64| (tokens as u128 * per_1k as u128).div_ceil(1000);
        let total = cost(input_tokens, self.price_per_1k_input_micros)
            + cost(output_tokens, self.price_per_1k_output_micros);
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    pub fn serves(&self, level: PrivacyLevel) -> bool {
        self.privacy_levels.is_empty() || self.privacy_levels.contains(&level)
    }
}
