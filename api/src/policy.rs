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
    status = "AgentPolicyStatus",
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
    /// MCP servers whose tools the intent rules may allow. Nothing here is reachable by a task until
    /// an intent rule lists one of its tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub mcp_servers: Vec<McpServer>,
    /// Most plan steps (model calls plus tool calls) one task may take; an intent rule may lower it.
    /// Absent means [`DEFAULT_MAX_STEPS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_steps: Option<u32>,
    /// Trips the kill switch (`suspend`) automatically when tasks fail or spend too fast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// What enrolled edge devices do locally, handed to each device when it enrolls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgePolicy>,
    /// Policy as code: Rego modules consulted at admission and before each tool call, after the
    /// rules above let a task or call through. See [`RegoPolicy`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<RegoPolicy>,
}

/// Rego modules (OPA's policy language) deciding admissions and tool calls, evaluated in-process.
///
/// The rule named by `query` (default `data.agentplane.decision`) must evaluate to the decision
/// document `{"allow": bool, "require_approval": bool, "reasons": [string]}` (`require_approval`
/// and `reasons` may be left out). `allow: false` refuses with the reasons; `require_approval: true`
/// parks the task (or the call) in AwaitingApproval. The input document's `kind` says what is being
/// decided: `"admission"` or `"tool_call"` (docs/architecture.md, "Rego policies", lists the fields).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegoPolicy {
    /// The modules, compiled together.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub modules: Vec<RegoModule>,
    /// The rule whose value is the decision document.
    #[serde(default = "default_rego_query")]
    #[schemars(
        length(min = 6, max = 256),
        regex(pattern = r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$")
    )]
    pub query: String,
}

/// The rule a [`RegoPolicy`] is read from when it names none.
pub const DEFAULT_REGO_QUERY: &str = "data.agentplane.decision";

fn default_rego_query() -> String {
    DEFAULT_REGO_QUERY.to_owned()
}

/// One Rego module: its source inline, or a key of a ConfigMap in the policy's namespace.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.inline) != has(self.configMapRef)").message("a Rego module has exactly one source: inline or configMapRef"))]
#[serde(rename_all = "camelCase")]
pub struct RegoModule {
    /// The module's name in errors, e.g. `admission.rego`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The module's source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub inline: Option<String>,
    /// A ConfigMap key holding the module's source (read by the runtime, not by the API server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What a Rego policy decided about a task or a call, as recorded in the task's status and the
/// audit log.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegoVerdict {
    pub decision: RegoDecisionKind,
    /// The policy's reasons, as it gave them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub reasons: Vec<String>,
    /// `sha256:<hex>` of the modules that decided (names and sources; see the architecture doc).
    #[schemars(length(max = 71))]
    pub digest: String,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RegoDecisionKind {
    Allow,
    Deny,
    RequireApproval,
}

impl RegoDecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RegoDecisionKind::Allow => "allow",
            RegoDecisionKind::Deny => "deny",
            RegoDecisionKind::RequireApproval => "require_approval",
        }
    }
}

/// The part of the policy an edge device applies itself, before anything leaves it. The gateway
/// returns it in every enrollment answer (`EnrollResponse.edgePolicy`); re-running `enroll` refreshes
/// it. `private` intents need no rule here: they never leave the device.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "camelCase")]
pub struct EdgePolicy {
    /// Where `regulated` intents run.
    #[serde(default)]
    pub regulated: RegulatedRoute,
}

/// Where an edge device runs a `regulated` intent.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum RegulatedRoute {
    /// On the device's local model (`agentplane-edge run --local-model`), never sent.
    Local,
    /// Sent to the gateway like a public intent (the behaviour before this field existed).
    #[default]
    Cloud,
    /// Refused on the device: nothing is stored or sent.
    Refuse,
}

impl RegulatedRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            RegulatedRoute::Local => "local",
            RegulatedRoute::Cloud => "cloud",
            RegulatedRoute::Refuse => "refuse",
        }
    }
}

/// Plan length when neither the policy nor the intent rule sets `maxSteps`.
pub const DEFAULT_MAX_STEPS: u32 = 16;

/// What the runtime records on the policy itself.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    /// Why the kill switch was set automatically; cleared by nobody but the operator of the policy
    /// (unsetting `spec.suspend` resumes work, this stays as the record of the last trip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_trip: Option<BreakerTrip>,
    /// `RegoCompiled`: whether `spec.rego` compiled (`False` names the module and line; the
    /// previously compiled modules stay in force until a version compiles).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// One automatic trip of the circuit breaker.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BreakerTrip {
    pub tripped_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// Human-readable cause, e.g. "5 of 5 tasks failed in the last 300 s (limit 5 failures)".
    #[schemars(length(max = 1024))]
    pub reason: String,
    /// Tasks that finished in the window, how many failed, and what the window spent.
    pub tasks: u32,
    pub failures: u32,
    pub spend_micros: u64,
}

/// One MCP server. Exactly one transport is set.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.stdio) != has(self.http)").message("an MCP server has exactly one transport: stdio or http"))]
#[serde(rename_all = "camelCase")]
pub struct McpServer {
    /// Name tool rules refer to; also the prefix of the tool names the model sees (`server__tool`).
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub name: String,
    /// A child process speaking MCP over its stdin/stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio: Option<StdioTransport>,
    /// A server speaking the MCP streamable HTTP transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTransport>,
    /// Longest one tool call (or the connection and tool listing) may take.
    #[serde(default = "default_call_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub call_timeout_seconds: u32,
    /// Largest tool result (its JSON text) fed back to the model; a larger one fails the call.
    #[serde(default = "default_max_result_bytes")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_result_bytes: u64,
    /// Most tools the server may list; a server listing more is refused as misbehaving.
    #[serde(default = "default_max_tools")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_tools: u32,
}

fn default_call_timeout() -> u32 {
    30
}

fn default_max_result_bytes() -> u64 {
    1 << 20
}

fn default_max_tools() -> u32 {
    256
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StdioTransport {
    #[schemars(length(min = 1, max = 1024))]
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub args: Vec<String>,
    /// Environment of the child process (nothing else of the worker's environment is passed on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<NamedValue>,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.url.startsWith('https://') || self.url.startsWith('http://127.0.0.1') || self.url.startsWith('http://localhost')").message("remote MCP servers must use https"))]
#[serde(rename_all = "camelCase")]
pub struct HttpTransport {
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Request headers, e.g. `Authorization` from a secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub headers: Vec<NamedValue>,
}

/// An environment variable or header: a literal value or a key of a KMS-sealed Secret. Secret values
/// are resolved by the worker only, never logged, never written to status, never sent to the edge.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.value) != has(self.secretRef)").message("set exactly one of value and secretRef"))]
#[serde(rename_all = "camelCase")]
pub struct NamedValue {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A tool an intent's plans may call.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ToolRule {
    /// The `mcpServers` entry serving the tool.
    #[schemars(length(min = 1, max = 32))]
    pub server: String,
    /// The tool's name as the server lists it.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Human in the loop: each call waits in AwaitingApproval until an approver approves exactly its
    /// arguments.
    #[serde(default)]
    pub requires_approval: bool,
    /// Calls of this tool allowed per window (scope user, device or namespace); a call over the limit
    /// is returned to the model as an error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub rate_limits: Vec<RateLimit>,
}

/// When to set `suspend` by itself. At least one trigger is set; triggers are read over the last
/// `windowSeconds`, and the failure triggers only once `minTasks` tasks finished in the window.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("has(self.failures) || has(self.failurePercent) || has(self.spendMicros)").message("a circuit breaker needs failures, failurePercent or spendMicros"))]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    #[schemars(range(min = 1, max = 2678400))]
    pub window_seconds: u32,
    /// Trip when this many tasks failed in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub failures: Option<u32>,
    /// Trip when at least this percentage of the window's finished tasks failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_percent: Option<u32>,
    /// Trip when the window's spend (every step of every task) reaches this, in millionths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub spend_micros: Option<u64>,
    /// Finished tasks the window needs before a failure trigger is read.
    #[serde(default = "default_min_tasks")]
    #[schemars(range(min = 1))]
    pub min_tasks: u32,
}

fn default_min_tasks() -> u32 {
    5
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
    /// Tools this intent's plans may call; a tool not listed is never offered to the model nor called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub tools: Vec<ToolRule>,
    /// Lowers the policy's `maxSteps` for this intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_steps: Option<u32>,
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

    /// The MCP server named `name`.
    pub fn mcp_server(&self, name: &str) -> Option<&McpServer> {
        self.mcp_servers.iter().find(|s| s.name == name)
    }

    /// Most steps a task of `intent_type` may take.
    pub fn max_steps_for(&self, intent_type: &str) -> u32 {
        let policy = self.max_steps.unwrap_or(DEFAULT_MAX_STEPS);
        match self.rule_for(intent_type).and_then(|r| r.max_steps) {
            Some(rule) => rule.min(policy),
            None => policy,
        }
    }

    /// The allow-list entry for `server`/`tool` under `intent_type`, if the tool is allowed.
    pub fn tool_rule(&self, intent_type: &str, server: &str, tool: &str) -> Option<&ToolRule> {
        self.rule_for(intent_type)?
            .tools
            .iter()
            .find(|t| t.server == server && t.name == tool)
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
