//! `agentplane_agent_policy`: an `AgentPolicy` (admission, privacy, rate limits, model tier
//! ladder, budgets, approvers, the suspend switch, and the agentic fields of
//! `agent_policy_agentic`), written by server-side apply.
//!
//! The spec is built as `agentplane_api::AgentPolicySpec`, so what reaches the cluster is
//! exactly the runtime's type; the CRD's own validation (CEL rules, enums, list maps) runs on
//! apply. The runtime reads the policy named `default`, hence the default name.

use std::collections::BTreeMap;

use agentplane_api::policy::{AgentPolicySpec, ModelTier, RateLimit};
use async_trait::async_trait;
use serde_json::{Value as Json, json};

use super::agent_policy_agentic as agentic;
use super::label;
use crate::config::ProviderData;
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, NestedBlock, Nesting, Resource, Schema, Type,
    Validator, Value,
};
use crate::kube::{self as k, Kube, ObjRef};

pub const TYPE: &str = "agentplane_agent_policy";
pub const API_VERSION: &str = "agentplane.dev/v1alpha1";

pub struct AgentPolicy;

pub const PRIVACY_LEVELS: &[&str] = &["private", "regulated", "public"];
pub const SCOPES: &[&str] = &["user", "device", "namespace"];
pub const ENDPOINT_KINDS: &[&str] = &["builtin", "openai", "anthropic"];
pub const PERIODS: &[&str] = &["Hour", "Day", "Week", "Month"];
const MAX_RATE_PERIOD: i64 = 2_678_400;

pub fn string_list(name: &'static str) -> Attribute {
    Attribute {
        ty: Type::list(Type::String),
        ..Attribute::string(name)
    }
}

pub fn list_block(name: &'static str, block: Block, max: i64) -> NestedBlock {
    NestedBlock {
        type_name: name,
        block,
        nesting: Nesting::List,
        min_items: 0,
        max_items: max,
    }
}

/// The block shape of one model tier (`agentplane_api::policy::ModelTier`), shared with
/// `agentplane_platform`'s `model_tier` blocks.
pub fn model_tier_block() -> Block {
    Block::new("One tier of the model ladder, most capable first.")
        .attr(Attribute::string("name").required().validate(Validator::LenRange(1, 63)).describe("Tier name, unique within the ladder."))
        .attr(Attribute::string("endpoint_kind").required().validate(Validator::OneOf(ENDPOINT_KINDS)).describe("`builtin`, `openai` or `anthropic`."))
        .attr(Attribute::string("endpoint").required().validate(Validator::LenRange(1, 2048)).describe("Base URL (https unless builtin or localhost), or `builtin:<name>`."))
        .attr(Attribute::string("model").optional().describe("Model name sent to the endpoint; defaults to the tier name."))
        .attr(Attribute::number("price_per_1k_input_micros").default(Value::int(0)).validate(Validator::IntRange(0, i64::MAX)).describe("Price per 1,000 input tokens in millionths of the currency unit."))
        .attr(Attribute::number("price_per_1k_output_micros").default(Value::int(0)).validate(Validator::IntRange(0, i64::MAX)).describe("Price per 1,000 output tokens in millionths of the currency unit."))
        .attr(string_list("privacy_levels").optional().describe("Privacy levels this tier may serve (`private`, `regulated`, `public`); unset means any."))
        .attr(Attribute::bool("gpu").default(Value::Bool(false)).describe("The tier runs on the GPU node pool."))
        .block(key_ref_block("secret_ref", "Secret holding the endpoint's API key."))
}

/// An at-most-one `{name, key}` block: a key of a Secret or ConfigMap in the policy's namespace.
pub fn key_ref_block(type_name: &'static str, description: &'static str) -> NestedBlock {
    let block = Block::new(description)
        .attr(
            Attribute::string("name")
                .required()
                .validate(Validator::LenRange(1, 253)),
        )
        .attr(
            Attribute::string("key")
                .required()
                .validate(Validator::LenRange(1, 253)),
        );
    list_block(type_name, block, 1)
}

/// The `{name, key}` of a [`key_ref_block`] value as API JSON, `None` when the block is absent.
pub fn key_ref_json(v: &Value) -> Option<Json> {
    k::items(v)
        .first()
        .map(|s| json!({ "name": s.get("name").as_str(), "key": s.get("key").as_str() }))
}

/// A `{name, key}` reference as a [`key_ref_block`] value (an empty list when absent).
pub fn key_ref_value(name_key: Option<(&str, &str)>) -> Value {
    Value::List(
        name_key
            .map(|(name, key)| {
                Value::Object(BTreeMap::from([
                    ("name".into(), Value::string(name)),
                    ("key".into(), Value::string(key)),
                ]))
            })
            .into_iter()
            .collect(),
    )
}

/// The CRD's rule for remote endpoints (model tiers, MCP servers): https, or plain http to the
/// loopback names it lists.
pub fn is_secure_url(url: &str) -> bool {
    url.starts_with("https://")
        || url.starts_with("http://127.0.0.1")
        || url.starts_with("http://localhost")
}

/// The block of one rate limit, shared by intent rules and their tools.
fn rate_limit_block(description: &'static str) -> Block {
    Block::new(description)
        .attr(
            Attribute::string("scope")
                .required()
                .validate(Validator::OneOf(SCOPES))
                .describe("`user`, `device` or `namespace`."),
        )
        .attr(
            Attribute::number("requests")
                .required()
                .validate(Validator::IntRange(1, u32::MAX as i64))
                .describe("Requests allowed per period."),
        )
        .attr(
            Attribute::number("period_seconds")
                .required()
                .validate(Validator::IntRange(1, MAX_RATE_PERIOD))
                .describe("Window length, 1 s to 31 days."),
        )
}

/// `rate_limit` blocks as API JSON.
pub(super) fn rate_limits_json(v: &Value) -> Vec<Json> {
    k::items(v.get("rate_limit"))
        .iter()
        .map(|r| {
            json!({
                "scope": r.get("scope").as_str(),
                "requests": num(r, "requests"),
                "periodSeconds": num(r, "period_seconds"),
            })
        })
        .collect()
}

/// API rate limits as `rate_limit` blocks.
pub(super) fn rate_limits_value(limits: &[RateLimit]) -> Value {
    Value::List(
        limits
            .iter()
            .map(|l| {
                Value::Object(BTreeMap::from([
                    ("scope".into(), Value::string(enum_str(&l.scope))),
                    ("requests".into(), Value::int(i64::from(l.requests))),
                    (
                        "period_seconds".into(),
                        Value::int(i64::from(l.period_seconds)),
                    ),
                ]))
            })
            .collect(),
    )
}

fn schema_block() -> Block {
    let intent = Block::new("The rule for one intent type.")
        .attr(Attribute::string("type").required().validate(Validator::LenRange(1, 63)).describe("Intent type, e.g. `summarize`."))
        .attr(Attribute::bool("allowed").default(Value::Bool(true)).describe("Whether the intent type is admitted at all."))
        .attr(Attribute::bool("requires_approval").default(Value::Bool(false)).describe("Tasks wait in AwaitingApproval until an approver decides."))
        .attr(string_list("privacy_levels").optional().describe("Privacy levels this intent may use; unset means any."))
        .attr(Attribute::string("on_rate_limit").default(Value::string("Deny")).validate(Validator::OneOf(&["Deny", "Hold"])).describe("`Deny` (with a retry-after) or `Hold` (stay Pending until the window has room)."))
        .attr(agentic::max_steps_attr("Lowers the policy's `max_steps` for this intent."))
        .block(list_block("rate_limit", rate_limit_block("A rate limit on this intent type."), 3))
        .block(list_block("tool", agentic::tool_block(rate_limit_block("Calls of this tool allowed per window; a call over the limit goes back to the model as an error.")), 128));
    let budget = Block::new("A spend limit; over budget means the next cheaper tier.")
        .attr(
            Attribute::string("scope")
                .required()
                .validate(Validator::OneOf(SCOPES))
                .describe("`user`, `device` or `namespace`."),
        )
        .attr(
            Attribute::number("limit_micros")
                .required()
                .validate(Validator::IntRange(0, i64::MAX))
                .describe("Spend allowed per period in millionths of the currency unit."),
        )
        .attr(
            Attribute::string("period")
                .required()
                .validate(Validator::OneOf(PERIODS))
                .describe("`Hour`, `Day`, `Week` or `Month`."),
        );
    Block::new("An AgentPolicy: which intents a namespace's tasks may run, how fast, on which model tiers and for how much. The runtime reads the policy named `default`.")
        .attr(Attribute::string("id").computed().describe("`<namespace>/<name>`."))
        .attr(Attribute::string("namespace").required().force_new().validate(Validator::LenRange(1, 63)).describe("Namespace of the policy (the runtime's namespace). Changing it replaces the policy."))
        .attr(Attribute::string("name").default(Value::string("default")).force_new().validate(Validator::LenRange(1, 253)).describe("Policy name; the runtime reads `default`. Changing it replaces the policy."))
        .attr(Attribute::bool("suspend").default(Value::Bool(false)).describe("The kill switch: no new task is admitted or dequeued while true."))
        .attr(Attribute::string("unlisted_intents").default(Value::string("Deny")).validate(Validator::OneOf(&["Deny", "Allow"])).describe("What happens to intent types no `intent` block names: `Deny` or `Allow`."))
        .attr(string_list("approvers").optional().describe("Identities allowed to approve or deny tasks that require approval."))
        .attr(Attribute::bool("force").default(Value::Bool(false)).describe("Take over fields another field manager owns instead of failing with a conflict."))
        .block(list_block("intent", intent, 128))
        .block(list_block("model", model_tier_block(), 16))
        .block(list_block("budget", budget, 32))
        .attr(agentic::max_steps_attr("Most plan steps (model calls plus tool calls) one task may take; unset means 16."))
        .block(list_block("mcp_server", agentic::mcp_server_block(), 32))
        .block(list_block("circuit_breaker", agentic::circuit_breaker_block(), 1))
        .block(list_block("rego", agentic::rego_block(), 1))
        .block(list_block("edge", agentic::edge_block(), 1))
}

fn check_list(v: &Value, allowed: &[&str], path: AttrPath, max: usize, diags: &mut Diagnostics) {
    let list = k::strings(v);
    for (i, s) in list.iter().enumerate() {
        if !allowed.contains(&s.as_str()) {
            diags.attr_error(
                path.index(i as i64),
                "Invalid value",
                format!(
                    "{path}[{i}] must be one of {}, got {s:?}.",
                    allowed.join(", ")
                ),
            );
        }
    }
    if list.len() > max {
        diags.attr_error(
            path.clone(),
            "Too many values",
            format!("{path} takes at most {max} values, got {}.", list.len()),
        );
    }
}

/// Checks the model tier blocks at `path` (names unique, endpoint scheme as the CRD's rule).
pub fn validate_tiers(tiers: &[Value], path: &AttrPath, diags: &mut Diagnostics) {
    let mut seen = BTreeMap::new();
    for (i, t) in tiers.iter().enumerate() {
        let p = path.index(i as i64);
        if let Some(name) = t.get("name").as_str()
            && let Some(first) = seen.insert(name.to_string(), i)
        {
            diags.attr_error(
                p.join("name"),
                "Duplicate model tier",
                format!("Tier {name:?} is already defined by {path}[{first}]."),
            );
        }
        if let (Some(kind), Some(ep)) =
            (t.get("endpoint_kind").as_str(), t.get("endpoint").as_str())
            && kind != "builtin"
            && !is_secure_url(ep)
        {
            diags.attr_error(
                p.join("endpoint"),
                "Insecure model endpoint",
                format!("Remote model endpoints must use https (or http://localhost / http://127.0.0.1), got {ep:?}."),
            );
        }
        check_list(
            t.get("privacy_levels"),
            PRIVACY_LEVELS,
            p.join("privacy_levels"),
            3,
            diags,
        );
    }
}

pub(super) fn num(v: &Value, name: &str) -> i64 {
    v.get(name).as_i64().unwrap_or(0)
}

/// A model tier block as the API type.
pub fn tier_from_value(t: &Value) -> Result<ModelTier, String> {
    let secret = key_ref_json(t.get("secret_ref"));
    let mut j = json!({
        "name": t.get("name").as_str(),
        "endpointKind": t.get("endpoint_kind").as_str(),
        "endpoint": t.get("endpoint").as_str(),
        "pricePer1kInputMicros": num(t, "price_per_1k_input_micros"),
        "pricePer1kOutputMicros": num(t, "price_per_1k_output_micros"),
        "privacyLevels": k::strings(t.get("privacy_levels")),
        "gpu": t.get("gpu").as_bool().unwrap_or(false),
    });
    if let Some(m) = k::opt_str(t.get("model")) {
        j["model"] = Json::String(m);
    }
    if let Some(s) = secret {
        j["secretRef"] = s;
    }
    serde_json::from_value(j).map_err(|e| format!("model tier: {e}"))
}

/// Serde name of an API enum value (`Deny`, `private`, ...).
pub(super) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Json::String(s)) => s,
        _ => String::new(),
    }
}

pub(super) fn nth(prior: &Value, i: usize) -> Value {
    k::items(prior).get(i).cloned().unwrap_or_default()
}

/// A model tier as a block value; `prior` (the same block in the prior state) decides the
/// form of empty optional lists.
pub fn tier_to_value(t: &ModelTier, prior: &Value) -> Value {
    let levels: Vec<String> = t.privacy_levels.iter().map(enum_str).collect();
    let secret = key_ref_value(
        t.secret_ref
            .as_ref()
            .map(|s| (s.name.as_str(), s.key.as_str())),
    );
    Value::Object(BTreeMap::from([
        ("name".into(), Value::string(t.name.as_str())),
        (
            "endpoint_kind".into(),
            Value::string(enum_str(&t.endpoint_kind)),
        ),
        ("endpoint".into(), Value::string(t.endpoint.as_str())),
        ("model".into(), Value::opt_string(t.model.clone())),
        (
            "price_per_1k_input_micros".into(),
            Value::int(i64::try_from(t.price_per_1k_input_micros).unwrap_or(i64::MAX)),
        ),
        (
            "price_per_1k_output_micros".into(),
            Value::int(i64::try_from(t.price_per_1k_output_micros).unwrap_or(i64::MAX)),
        ),
        (
            "privacy_levels".into(),
            k::string_list(&levels, prior.get("privacy_levels")),
        ),
        ("gpu".into(), Value::Bool(t.gpu)),
        ("secret_ref".into(), secret),
    ]))
}

/// The planned/state value as the API spec.
pub fn spec_from_value(v: &Value) -> Result<AgentPolicySpec, String> {
    let intents: Vec<Json> = k::items(v.get("intent"))
        .iter()
        .map(|i| {
            json!({
                "type": i.get("type").as_str(),
                "allowed": i.get("allowed").as_bool().unwrap_or(true),
                "requiresApproval": i.get("requires_approval").as_bool().unwrap_or(false),
                "privacyLevels": k::strings(i.get("privacy_levels")),
                "rateLimits": rate_limits_json(i),
                "onRateLimit": i.get("on_rate_limit").as_str().unwrap_or("Deny"),
                "tools": agentic::tools_json(i),
                "maxSteps": agentic::opt_num(i, "max_steps"),
            })
        })
        .collect();
    let models = k::items(v.get("model"))
        .iter()
        .map(tier_from_value)
        .collect::<Result<Vec<_>, _>>()?;
    let budgets: Vec<Json> = k::items(v.get("budget"))
        .iter()
        .map(|b| {
            json!({
                "scope": b.get("scope").as_str(),
                "limitMicros": num(b, "limit_micros"),
                "period": b.get("period").as_str(),
            })
        })
        .collect();
    let mut j = json!({
        "suspend": v.get("suspend").as_bool().unwrap_or(false),
        "intents": intents,
        "unlistedIntents": v.get("unlisted_intents").as_str().unwrap_or("Deny"),
        "budgets": budgets,
        "approvers": k::strings(v.get("approvers")),
    });
    agentic::insert_json(v, &mut j);
    let mut spec: AgentPolicySpec =
        serde_json::from_value(j).map_err(|e| format!("policy spec: {e}"))?;
    spec.models = models;
    Ok(spec)
}

/// Writes the spec's values into `s` (a state object), keeping prior forms of empty lists.
pub fn spec_to_value(spec: &AgentPolicySpec, s: &mut Value, prior: &Value) {
    s.set("suspend", Value::Bool(spec.suspend));
    s.set(
        "unlisted_intents",
        Value::string(enum_str(&spec.unlisted_intents)),
    );
    s.set(
        "approvers",
        k::string_list(&spec.approvers, prior.get("approvers")),
    );
    let intents = spec
        .intents
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let p = nth(prior.get("intent"), i);
            let levels: Vec<String> = r.privacy_levels.iter().map(enum_str).collect();
            Value::Object(BTreeMap::from([
                ("type".into(), Value::string(r.kind.as_str())),
                ("allowed".into(), Value::Bool(r.allowed)),
                ("requires_approval".into(), Value::Bool(r.requires_approval)),
                (
                    "privacy_levels".into(),
                    k::string_list(&levels, p.get("privacy_levels")),
                ),
                (
                    "on_rate_limit".into(),
                    Value::string(enum_str(&r.on_rate_limit)),
                ),
                ("rate_limit".into(), rate_limits_value(&r.rate_limits)),
                ("tool".into(), agentic::tools_value(&r.tools)),
                ("max_steps".into(), agentic::opt_int(r.max_steps)),
            ]))
        })
        .collect();
    s.set("intent", Value::List(intents));
    let models = spec
        .models
        .iter()
        .enumerate()
        .map(|(i, t)| tier_to_value(t, &nth(prior.get("model"), i)))
        .collect();
    s.set("model", Value::List(models));
    let budgets = spec
        .budgets
        .iter()
        .map(|b| {
            Value::Object(BTreeMap::from([
                ("scope".into(), Value::string(enum_str(&b.scope))),
                ("limit_micros".into(), Value::int(b.limit_micros)),
                ("period".into(), Value::string(enum_str(&b.period))),
            ]))
        })
        .collect();
    s.set("budget", Value::List(budgets));
    agentic::write_values(spec, s, prior);
}

/// The AgentPolicy object applied for a planned value.
pub fn manifest(v: &Value) -> Result<Json, String> {
    let spec = spec_from_value(v)?;
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "AgentPolicy",
        "metadata": {
            "name": v.get("name").as_str().unwrap_or("default"),
            "namespace": v.get("namespace").as_str(),
            "labels": { "app.kubernetes.io/managed-by": k::FIELD_MANAGER },
        },
        "spec": serde_json::to_value(&spec).map_err(|e| e.to_string())?,
    }))
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("name").as_str())
}

fn obj_ref(v: &Value) -> ObjRef {
    ObjRef::new(
        API_VERSION,
        "AgentPolicy",
        v.get("namespace").as_str(),
        v.get("name").as_str().unwrap_or("default"),
    )
}

fn id(v: &Value) -> Value {
    match (v.get("namespace").as_str(), v.get("name").as_str()) {
        (Some(ns), Some(n)) => Value::string(format!("{ns}/{n}")),
        _ => Value::UNKNOWN,
    }
}

async fn apply(data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
    let w = what(planned);
    let m =
        manifest(planned).map_err(|e| Diagnostics::single(format!("Invalid policy for {w}"), e))?;
    let kube = Kube::connect(&data.kube, &w).await?;
    kube.apply(&w, &m, k::force(planned)).await?;
    let mut s = planned.clone();
    s.set("id", id(planned));
    Ok(s)
}

#[async_trait]
impl Resource<ProviderData> for AgentPolicy {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: schema_block(),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        if let Some(ns) = config.get("namespace").as_str()
            && !k::is_dns_label(ns)
        {
            diags.attr_error(
                AttrPath::attr("namespace"),
                "Invalid namespace",
                format!("{ns:?} is not a valid namespace name (lowercase letters, digits, '-')."),
            );
        }
        if let Some(n) = config.get("name").as_str()
            && !k::is_dns_subdomain(n)
        {
            diags.attr_error(
                AttrPath::attr("name"),
                "Invalid name",
                format!("{n:?} is not a valid object name (lowercase RFC 1123 subdomain)."),
            );
        }
        if k::strings(config.get("approvers")).len() > 64 {
            diags.attr_error(
                AttrPath::attr("approvers"),
                "Too many approvers",
                "At most 64 approvers.",
            );
        }
        let mut seen = BTreeMap::new();
        for (i, it) in k::items(config.get("intent")).iter().enumerate() {
            let p = AttrPath::attr("intent").index(i as i64);
            if let Some(t) = it.get("type").as_str()
                && let Some(first) = seen.insert(t.to_string(), i)
            {
                diags.attr_error(
                    p.join("type"),
                    "Duplicate intent rule",
                    format!("Intent type {t:?} already has a rule at intent[{first}]."),
                );
            }
            check_list(
                it.get("privacy_levels"),
                PRIVACY_LEVELS,
                p.join("privacy_levels"),
                3,
                diags,
            );
        }
        validate_tiers(
            k::items(config.get("model")),
            &AttrPath::attr("model"),
            diags,
        );
        agentic::validate(config, diags);
    }

    fn modify_plan(
        &self,
        _prior: &Value,
        planned: &mut Value,
        _config: &Value,
        _diags: &mut Diagnostics,
    ) {
        let i = id(planned);
        planned.set("id", i);
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        apply(data, planned).await
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let w = what(state);
        let kube = Kube::connect(&data.kube, &w).await?;
        let Some(live) = kube.get(&w, &obj_ref(state)).await? else {
            return Ok(None);
        };
        let spec: AgentPolicySpec = serde_json::from_value(live["spec"].clone()).map_err(|e| {
            Diagnostics::single(
                format!("Unreadable AgentPolicy for {w}"),
                format!("{}: {e}", obj_ref(state)),
            )
        })?;
        let mut s = match state {
            Value::Object(_) => state.clone(),
            _ => Value::Object(BTreeMap::new()),
        };
        spec_to_value(&spec, &mut s, state);
        s.set("id", id(state));
        if s.get("force").is_null() {
            s.set("force", Value::Bool(false));
        }
        Ok(Some(s))
    }

    async fn update(
        &self,
        data: &ProviderData,
        _prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        apply(data, planned).await
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let w = what(state);
        let kube = Kube::connect(&data.kube, &w).await?;
        kube.delete(&w, &obj_ref(state)).await
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        let (ns, name) = k::split_import_id(TYPE, id)?;
        Ok(Value::Object(BTreeMap::from([
            ("namespace".into(), Value::string(ns)),
            ("name".into(), Value::string(name)),
        ])))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn obj(pairs: Vec<(&str, Value)>) -> Value {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn list(items: Vec<Value>) -> Value {
        Value::List(items)
    }

    fn key_ref(name: &str, key: &str) -> Value {
        list(vec![obj(vec![
            ("name", Value::string(name)),
            ("key", Value::string(key)),
        ])])
    }

    fn named(name: &str, value: Option<&str>, secret: Option<(&str, &str)>) -> Value {
        obj(vec![
            ("name", Value::string(name)),
            ("value", Value::opt_string(value)),
            (
                "secret_ref",
                secret.map_or(list(vec![]), |(n, k)| key_ref(n, k)),
            ),
        ])
    }

    /// Every agentic block set, as Terraform plans them (absent blocks as `[]`).
    fn agentic() -> Vec<(&'static str, Value)> {
        let stdio = obj(vec![
            ("name", Value::string("files")),
            (
                "stdio",
                list(vec![obj(vec![
                    ("command", Value::string("npx")),
                    (
                        "args",
                        list(vec![
                            Value::string("-y"),
                            Value::string("server-everything"),
                        ]),
                    ),
                    (
                        "env",
                        list(vec![
                            named("TOKEN", None, Some(("mcp", "token"))),
                            named("LOG", Some("debug"), None),
                        ]),
                    ),
                ])]),
            ),
            ("http", list(vec![])),
            ("call_timeout_seconds", Value::int(30)),
            ("max_result_bytes", Value::int(1 << 20)),
            ("max_tools", Value::int(256)),
        ]);
        let http = obj(vec![
            ("name", Value::string("search")),
            ("stdio", list(vec![])),
            (
                "http",
                list(vec![obj(vec![
                    ("url", Value::string("https://search.example.com/mcp")),
                    (
                        "header",
                        list(vec![named(
                            "Authorization",
                            None,
                            Some(("search", "bearer")),
                        )]),
                    ),
                ])]),
            ),
            ("call_timeout_seconds", Value::int(5)),
            ("max_result_bytes", Value::int(65536)),
            ("max_tools", Value::int(8)),
        ]);
        let breaker = obj(vec![
            ("window_seconds", Value::int(300)),
            ("failures", Value::int(5)),
            ("failure_percent", Value::Null),
            ("spend_micros", Value::int(1_000_000)),
            ("min_tasks", Value::int(5)),
        ]);
        let rego = obj(vec![
            ("query", Value::string("data.agentplane.decision")),
            (
                "module",
                list(vec![
                    obj(vec![
                        ("name", Value::string("admission.rego")),
                        ("inline", Value::string("package agentplane\n")),
                        ("config_map_ref", list(vec![])),
                    ]),
                    obj(vec![
                        ("name", Value::string("tools.rego")),
                        ("inline", Value::Null),
                        ("config_map_ref", key_ref("rego", "tools.rego")),
                    ]),
                ]),
            ),
        ]);
        vec![
            ("max_steps", Value::int(32)),
            ("mcp_server", list(vec![stdio, http])),
            ("circuit_breaker", list(vec![breaker])),
            ("rego", list(vec![rego])),
            (
                "edge",
                list(vec![obj(vec![("regulated", Value::string("local"))])]),
            ),
        ]
    }

    pub(crate) fn sample() -> Value {
        let limit = obj(vec![
            ("scope", Value::string("device")),
            ("requests", Value::int(10)),
            ("period_seconds", Value::int(60)),
        ]);
        let intent = obj(vec![
            ("type", Value::string("summarize")),
            ("allowed", Value::Bool(true)),
            ("requires_approval", Value::Bool(true)),
            (
                "privacy_levels",
                Value::List(vec![Value::string("private")]),
            ),
            ("on_rate_limit", Value::string("Hold")),
            ("rate_limit", Value::List(vec![limit.clone()])),
            ("max_steps", Value::int(8)),
            (
                "tool",
                list(vec![obj(vec![
                    ("server", Value::string("files")),
                    ("name", Value::string("write_file")),
                    ("requires_approval", Value::Bool(true)),
                    ("rate_limit", list(vec![limit.clone()])),
                ])]),
            ),
        ]);
        let tier = obj(vec![
            ("name", Value::string("small")),
            ("endpoint_kind", Value::string("openai")),
            ("endpoint", Value::string("https://vllm.models.svc/v1")),
            ("model", Value::Null),
            ("price_per_1k_input_micros", Value::int(200)),
            ("price_per_1k_output_micros", Value::int(400)),
            ("privacy_levels", Value::Null),
            ("gpu", Value::Bool(true)),
            (
                "secret_ref",
                Value::List(vec![obj(vec![
                    ("name", Value::string("vllm")),
                    ("key", Value::string("token")),
                ])]),
            ),
        ]);
        let budget = obj(vec![
            ("scope", Value::string("user")),
            ("limit_micros", Value::int(5_000_000)),
            ("period", Value::string("Day")),
        ]);
        let mut fields = agentic();
        fields.extend(vec![
            ("namespace", Value::string("team-a")),
            ("name", Value::string("default")),
            ("suspend", Value::Bool(false)),
            ("unlisted_intents", Value::string("Allow")),
            ("approvers", Value::List(vec![Value::string("alice")])),
            ("force", Value::Bool(false)),
            ("intent", Value::List(vec![intent])),
            ("model", Value::List(vec![tier])),
            ("budget", Value::List(vec![budget])),
        ]);
        obj(fields)
    }

    #[test]
    fn value_round_trips_through_the_api_type() {
        let v = sample();
        let spec = spec_from_value(&v).unwrap();
        assert_eq!(spec.intents[0].rate_limits[0].requests, 10);
        assert_eq!(spec.models[0].secret_ref.as_ref().unwrap().key, "token");
        let m = manifest(&v).unwrap();
        assert_eq!(m["spec"]["unlistedIntents"], "Allow");
        assert_eq!(m["spec"]["intents"][0]["onRateLimit"], "Hold");
        let spec_json = &m["spec"];
        assert_eq!(spec_json["maxSteps"], 32);
        assert_eq!(
            spec_json["intents"][0]["tools"],
            json!([{"server": "files", "name": "write_file", "requiresApproval": true,
                    "rateLimits": [{"scope": "device", "requests": 10, "periodSeconds": 60}]}])
        );
        assert_eq!(spec_json["intents"][0]["maxSteps"], 8);
        assert_eq!(
            spec_json["mcpServers"][0]["stdio"],
            json!({"command": "npx", "args": ["-y", "server-everything"], "env": [
                {"name": "TOKEN", "secretRef": {"name": "mcp", "key": "token"}},
                {"name": "LOG", "value": "debug"}]})
        );
        // Only the Secret reference is sent: no value key next to it.
        assert_eq!(
            spec_json["mcpServers"][1]["http"],
            json!({"url": "https://search.example.com/mcp", "headers": [
                {"name": "Authorization", "secretRef": {"name": "search", "key": "bearer"}}]})
        );
        assert_eq!(spec_json["mcpServers"][1]["callTimeoutSeconds"], 5);
        assert_eq!(spec_json["mcpServers"][1]["maxResultBytes"], 65536);
        assert_eq!(
            spec_json["circuitBreaker"],
            json!({"windowSeconds": 300, "failures": 5, "spendMicros": 1_000_000, "minTasks": 5})
        );
        assert_eq!(
            spec_json["rego"],
            json!({"query": "data.agentplane.decision", "modules": [
                {"name": "admission.rego", "inline": "package agentplane\n"},
                {"name": "tools.rego", "configMapRef": {"name": "rego", "key": "tools.rego"}}]})
        );
        assert_eq!(spec_json["edge"], json!({"regulated": "local"}));
        let mut back = v.clone();
        spec_to_value(&spec, &mut back, &v);
        assert_eq!(back, v);
    }

    #[test]
    fn validation_reports_paths() {
        let mut v = sample();
        let Value::List(mut intents) = v.get("intent").clone() else {
            panic!()
        };
        intents.push(intents[0].clone());
        intents[1].set("privacy_levels", Value::List(vec![Value::string("secret")]));
        v.set("intent", Value::List(intents));
        let Value::List(mut tiers) = v.get("model").clone() else {
            panic!()
        };
        tiers[0].set("endpoint", Value::string("http://example.com"));
        v.set("model", Value::List(tiers));
        let mut d = Diagnostics::new();
        AgentPolicy.validate(&v, &mut d);
        let paths: Vec<String> =
            d.0.iter()
                .map(|d| d.path.as_ref().unwrap().to_string())
                .collect();
        assert_eq!(
            paths,
            vec![
                "intent[1].type",
                "intent[1].privacy_levels[0]",
                "model[0].endpoint"
            ]
        );
    }

    #[test]
    fn import_id() {
        let v = AgentPolicy.import_state("team-a/default").unwrap();
        assert_eq!(v.get("namespace"), &Value::string("team-a"));
        assert!(AgentPolicy.import_state("default").is_err());
    }
}
