//! The agentic part of `agentplane_agent_policy` (issue 14): MCP servers, the tool allow-list and
//! step limit of each intent rule, the policy's step limit, the circuit breaker, Rego modules and
//! the edge routing. Here are their blocks, the checks that mirror the CRD's limits and CEL rules
//! (so `plan` refuses, with the attribute path, what the API server would refuse at apply), and
//! the mapping to and from `agentplane_api::policy`.
//!
//! Secret values never pass through the provider: an env entry or header holds a literal `value`
//! or a `secret_ref {name, key}`, and only the reference is sent and kept in state.

use std::collections::{BTreeMap, BTreeSet};

use agentplane_api::policy::{
    AgentPolicySpec, CircuitBreaker, DEFAULT_REGO_QUERY, McpServer, NamedValue, RegoPolicy,
    RegulatedRoute, ToolRule,
};
use serde_json::{Value as Json, json};

use super::agent_policy::{
    enum_str, is_secure_url, key_ref_block, key_ref_json, key_ref_value, list_block, nth, num,
    string_list,
};
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, NestedBlock, Nesting, Validator, Value,
};
use crate::kube as k;

/// The CRD's `maxSteps` bounds (policy and intent rule alike).
const MAX_STEPS: i64 = 256;
/// The CRD's longest circuit-breaker window (31 days), as for rate limits.
const MAX_WINDOW_SECONDS: i64 = 2_678_400;
/// Where `regulated` intents may run (`RegulatedRoute`'s serde names).
pub const REGULATED_ROUTES: &[&str] = &["local", "cloud", "refuse"];

/// `max_steps`, optional: unset leaves the CRD's field absent (the runtime's default applies).
pub fn max_steps_attr(description: &'static str) -> Attribute {
    Attribute::number("max_steps")
        .optional()
        .validate(Validator::IntRange(1, MAX_STEPS))
        .describe(description)
}

/// One env entry or header (`NamedValue`): a literal or a Secret key, never both.
fn named_value_block(description: &'static str) -> Block {
    Block::new(description)
        .attr(
            Attribute::string("name")
                .required()
                .validate(Validator::LenRange(1, 256))
                .describe("Name, unique within the list."),
        )
        .attr(
            Attribute::string("value")
                .optional()
                .validate(Validator::LenRange(0, 8192))
                .describe("A literal value, stored in the AgentPolicy and in state as written; set this or `secret_ref`."),
        )
        .block(key_ref_block(
            "secret_ref",
            "A key of a KMS-sealed Secret in the policy's namespace, resolved by the worker only; only this reference is sent and stored.",
        ))
}

/// One `mcp_server` block (`McpServer`). Defaults are the CRD's (a unit test keeps them equal).
pub fn mcp_server_block() -> Block {
    let stdio = Block::new("A child process speaking MCP over its stdin/stdout.")
        .attr(
            Attribute::string("command")
                .required()
                .validate(Validator::LenRange(1, 1024))
                .describe("The program to run."),
        )
        .attr(string_list("args").optional().describe("Its arguments, at most 64."))
        .block(list_block(
            "env",
            named_value_block("An environment variable of the child; nothing else of the worker's environment is passed on."),
            64,
        ));
    let http = Block::new("A server speaking the MCP streamable HTTP transport.")
        .attr(
            Attribute::string("url")
                .required()
                .validate(Validator::LenRange(1, 2048))
                .describe("https, or http to 127.0.0.1 / localhost."),
        )
        .block(list_block(
            "header",
            named_value_block("A request header, e.g. `Authorization` from a Secret."),
            32,
        ));
    Block::new(
        "An MCP server whose tools intent rules may allow; exactly one of `stdio` and `http`.",
    )
    .attr(
        Attribute::string("name")
            .required()
            .validate(Validator::LenRange(1, 32))
            .describe("Lowercase letters, digits and '-', unique; what `tool.server` names."),
    )
    .attr(
        Attribute::number("call_timeout_seconds")
            .default(Value::int(30))
            .validate(Validator::IntRange(1, 3600))
            .describe("Longest one tool call (or connecting and listing tools) may take."),
    )
    .attr(
        Attribute::number("max_result_bytes")
            .default(Value::int(1 << 20))
            .validate(Validator::IntRange(1, 16_777_216))
            .describe("Largest tool result fed back to the model; a larger one fails the call."),
    )
    .attr(
        Attribute::number("max_tools")
            .default(Value::int(256))
            .validate(Validator::IntRange(1, 4096))
            .describe("Most tools the server may list; more is refused as misbehaving."),
    )
    .block(list_block("stdio", stdio, 1))
    .block(list_block("http", http, 1))
}

/// One `tool` block of an intent rule (`ToolRule`); `rate_limit` is the intent's own block.
pub fn tool_block(rate_limit: Block) -> Block {
    Block::new("A tool this intent's plans may call; a tool no block names is neither offered to the model nor called.")
        .attr(
            Attribute::string("server")
                .required()
                .validate(Validator::LenRange(1, 32))
                .describe("The `mcp_server` serving the tool."),
        )
        .attr(
            Attribute::string("name")
                .required()
                .validate(Validator::LenRange(1, 128))
                .describe("The tool's name as the server lists it."),
        )
        .attr(
            Attribute::bool("requires_approval")
                .default(Value::Bool(false))
                .describe("Each call waits for an approver, who approves exactly its arguments."),
        )
        .block(list_block("rate_limit", rate_limit, 3))
}

pub fn circuit_breaker_block() -> Block {
    Block::new("Sets `suspend` by itself when tasks fail or spend too fast; at least one of `failures`, `failure_percent` and `spend_micros`.")
        .attr(
            Attribute::number("window_seconds")
                .required()
                .validate(Validator::IntRange(1, MAX_WINDOW_SECONDS))
                .describe("The window the triggers are read over, 1 s to 31 days."),
        )
        .attr(
            Attribute::number("failures")
                .optional()
                .validate(Validator::IntRange(1, u32::MAX as i64))
                .describe("Trip when this many tasks failed in the window."),
        )
        .attr(
            Attribute::number("failure_percent")
                .optional()
                .validate(Validator::IntRange(1, 100))
                .describe("Trip when at least this percentage of the window's finished tasks failed."),
        )
        .attr(
            Attribute::number("spend_micros")
                .optional()
                .validate(Validator::IntRange(1, i64::MAX))
                .describe("Trip when the window's spend reaches this, in millionths of the currency unit."),
        )
        .attr(
            Attribute::number("min_tasks")
                .default(Value::int(5))
                .validate(Validator::IntRange(1, u32::MAX as i64))
                .describe("Finished tasks the window needs before a failure trigger is read."),
        )
}

pub fn rego_block() -> Block {
    let module = Block::new("One Rego module; exactly one of `inline` and `config_map_ref`.")
        .attr(
            Attribute::string("name")
                .required()
                .validate(Validator::LenRange(1, 253))
                .describe("The module's name in errors, e.g. `admission.rego`; unique."),
        )
        .attr(
            Attribute::string("inline")
                .optional()
                .validate(Validator::LenRange(0, 262_144))
                .describe("The module's source."),
        )
        .block(key_ref_block(
            "config_map_ref",
            "A ConfigMap key in the policy's namespace holding the source (read by the runtime).",
        ));
    Block::new("Rego modules consulted at admission and before each tool call, after the rules above let a task or call through.")
        .attr(
            Attribute::string("query")
                .default(Value::string(DEFAULT_REGO_QUERY))
                .validate(Validator::LenRange(6, 256))
                .describe("The rule whose value is the decision document, a `data.` path."),
        )
        .block(NestedBlock {
            type_name: "module",
            block: module,
            nesting: Nesting::List,
            min_items: 1,
            max_items: 16,
        })
}

pub fn edge_block() -> Block {
    Block::new("What enrolled edge devices do locally, handed to each device when it enrolls.")
        .attr(
            Attribute::string("regulated")
                .default(Value::string(RegulatedRoute::default().as_str()))
                .validate(Validator::OneOf(REGULATED_ROUTES))
                .describe("Where `regulated` intents run: `local`, `cloud` or `refuse`."),
        )
}

// ---------------------------------------------------------------------------------------------
// Validation: what the CRD's patterns, list-map keys and CEL rules would refuse at apply.
// ---------------------------------------------------------------------------------------------

/// Whether a value counts as set for a one-of rule (`has()` in CEL); `None` while unknown.
fn is_set(v: &Value) -> Option<bool> {
    match v {
        Value::Unknown(_) => None,
        Value::Null => Some(false),
        Value::List(items) | Value::Set(items) => Some(!items.is_empty()),
        _ => Some(true),
    }
}

/// Exactly one of `a` and `b` in `item` (at `path`, an element of a block list whose blocks all
/// have a `name`). Both set points at `b`; neither points at the element's `name`, as the clients
/// cannot place a path ending in a block's index and would show the whole resource instead.
fn exactly_one(
    item: &Value,
    a: &str,
    b: &str,
    path: &AttrPath,
    summary: &str,
    d: &mut Diagnostics,
) {
    let (Some(x), Some(y)) = (is_set(item.get(a)), is_set(item.get(b))) else {
        return;
    };
    if x && y {
        d.attr_error(
            path.join(b),
            summary,
            format!("{path} sets both `{a}` and `{b}`; set exactly one."),
        );
    } else if !x && !y {
        d.attr_error(
            path.join("name"),
            summary,
            format!("{path} sets neither `{a}` nor `{b}`; set exactly one."),
        );
    }
}

/// Values of `key` unique across `items` (a list-map key in the CRD: the API server refuses
/// duplicates).
fn unique(items: &[Value], key: &str, path: &AttrPath, summary: &str, d: &mut Diagnostics) {
    let mut seen = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        if let Some(name) = it.get(key).as_str()
            && let Some(first) = seen.insert(name.to_string(), i)
        {
            d.attr_error(
                path.index(i as i64).join(key),
                summary,
                format!("{key} {name:?} is already used by {path}[{first}]."),
            );
        }
    }
}

/// `^data(\.[A-Za-z_][A-Za-z0-9_]*)+$`, the CRD's pattern for `rego.query`.
fn is_data_path(q: &str) -> bool {
    let ident = |s: &str| {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    match q.strip_prefix("data.") {
        Some(rest) => rest.split('.').all(ident),
        None => false,
    }
}

fn validate_named_values(items: &[Value], path: &AttrPath, d: &mut Diagnostics) {
    unique(items, "name", path, "Duplicate name", d);
    for (i, e) in items.iter().enumerate() {
        exactly_one(
            e,
            "value",
            "secret_ref",
            &path.index(i as i64),
            "Value or secret_ref",
            d,
        );
    }
}

/// Checks the `mcp_server` blocks; returns their names when all are known.
fn validate_servers(config: &Value, d: &mut Diagnostics) -> Option<BTreeSet<String>> {
    let path = AttrPath::attr("mcp_server");
    let servers = k::items(config.get("mcp_server"));
    unique(servers, "name", &path, "Duplicate MCP server", d);
    let mut names = Some(BTreeSet::new());
    for (i, s) in servers.iter().enumerate() {
        let p = path.index(i as i64);
        match s.get("name").as_str() {
            Some(n) => {
                if !k::is_dns_label(n) {
                    d.attr_error(
                        p.join("name"),
                        "Invalid MCP server name",
                        format!("{p}.name must be lowercase letters, digits and '-' (not at either end), got {n:?}."),
                    );
                }
                if let Some(set) = names.as_mut() {
                    set.insert(n.to_string());
                }
            }
            None => names = None,
        }
        exactly_one(s, "stdio", "http", &p, "One MCP transport", d);
        if let Some(st) = k::items(s.get("stdio")).first() {
            let sp = p.join("stdio").index(0);
            let args = k::items(st.get("args")).len();
            if args > 64 {
                d.attr_error(
                    sp.join("args"),
                    "Too many values",
                    format!("{sp}.args takes at most 64 values, got {args}."),
                );
            }
            validate_named_values(k::items(st.get("env")), &sp.join("env"), d);
        }
        if let Some(h) = k::items(s.get("http")).first() {
            let hp = p.join("http").index(0);
            if let Some(url) = h.get("url").as_str()
                && !is_secure_url(url)
            {
                d.attr_error(
                    hp.join("url"),
                    "Insecure MCP server URL",
                    format!("{hp}.url: remote MCP servers must use https (or http://localhost / http://127.0.0.1), got {url:?}."),
                );
            }
            validate_named_values(k::items(h.get("header")), &hp.join("header"), d);
        }
    }
    names
}

/// The agentic checks of a configuration (see the module docs).
pub fn validate(config: &Value, d: &mut Diagnostics) {
    let servers = validate_servers(config, d);
    // A tool of an undeclared server is accepted by the API server but never callable: warn.
    for (i, it) in k::items(config.get("intent")).iter().enumerate() {
        for (j, t) in k::items(it.get("tool")).iter().enumerate() {
            if let (Some(names), Some(server)) = (&servers, t.get("server").as_str())
                && !names.contains(server)
            {
                d.warning(
                    "Tool of an undeclared MCP server",
                    format!("intent[{i}].tool[{j}].server is {server:?}, which no mcp_server block declares: the runtime never offers or calls this tool."),
                );
            }
        }
    }
    for (i, b) in k::items(config.get("circuit_breaker")).iter().enumerate() {
        let p = AttrPath::attr("circuit_breaker").index(i as i64);
        let triggers = ["failures", "failure_percent", "spend_micros"];
        let set: Vec<Option<bool>> = triggers.iter().map(|t| is_set(b.get(t))).collect();
        if set.iter().all(|s| *s == Some(false)) {
            // Pointing inside the block places it in the client's output (see `exactly_one`).
            d.attr_error(
                p.join("window_seconds"),
                "Circuit breaker without a trigger",
                format!(
                    "{p} needs at least one of `failures`, `failure_percent` and `spend_micros`."
                ),
            );
        }
    }
    for (i, r) in k::items(config.get("rego")).iter().enumerate() {
        let p = AttrPath::attr("rego").index(i as i64);
        if let Some(q) = r.get("query").as_str()
            && !is_data_path(q)
        {
            d.attr_error(
                p.join("query"),
                "Invalid Rego query",
                format!(
                    "{p}.query must be a rule path like `data.agentplane.decision`, got {q:?}."
                ),
            );
        }
        let modules = k::items(r.get("module"));
        let mp = p.join("module");
        unique(modules, "name", &mp, "Duplicate Rego module", d);
        for (j, m) in modules.iter().enumerate() {
            exactly_one(
                m,
                "inline",
                "config_map_ref",
                &mp.index(j as i64),
                "One Rego module source",
                d,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding: Terraform values -> API JSON, and the API type -> Terraform values.
// ---------------------------------------------------------------------------------------------

/// An optional number attribute as JSON (`null` when unset).
pub fn opt_num(v: &Value, name: &str) -> Json {
    v.get(name).as_i64().map_or(Json::Null, Json::from)
}

/// An optional API number as a Terraform value.
pub fn opt_int<T: Into<i64>>(n: Option<T>) -> Value {
    n.map_or(Value::Null, |n| Value::int(n.into()))
}

/// A block of `name` plus exactly one source, a literal or a `{name, key}` reference (an env
/// entry or header: `value` | `secret_ref`; a Rego module: `inline` | `config_map_ref`), as API
/// JSON; `fields` pairs each attribute with its API name.
fn one_source_json(v: &Value, fields: [(&str, &str); 2]) -> Json {
    let [(literal, literal_api), (reference, reference_api)] = fields;
    let mut j = serde_json::Map::new();
    j.insert("name".into(), json!(v.get("name").as_str()));
    j.insert(literal_api.into(), json!(v.get(literal).as_str()));
    j.insert(reference_api.into(), json!(key_ref_json(v.get(reference))));
    Json::Object(j)
}

/// The [`one_source_json`] counterpart: `literal` and `reference` are (attribute, API value).
fn one_source_value(
    name: &str,
    literal: (&str, Option<&String>),
    reference: (&str, Option<(&str, &str)>),
) -> Value {
    obj([
        ("name", Value::string(name)),
        (literal.0, Value::opt_string(literal.1.cloned())),
        (reference.0, key_ref_value(reference.1)),
    ])
}

const VALUE_OR_SECRET: [(&str, &str); 2] = [("value", "value"), ("secret_ref", "secretRef")];

fn named_values_json(items: &[Value]) -> Vec<Json> {
    items
        .iter()
        .map(|e| one_source_json(e, VALUE_OR_SECRET))
        .collect()
}

fn server_json(s: &Value) -> Json {
    json!({
        "name": s.get("name").as_str(),
        "stdio": k::items(s.get("stdio")).first().map(|st| json!({
            "command": st.get("command").as_str(),
            "args": k::strings(st.get("args")),
            "env": named_values_json(k::items(st.get("env"))),
        })),
        "http": k::items(s.get("http")).first().map(|h| json!({
            "url": h.get("url").as_str(),
            "headers": named_values_json(k::items(h.get("header"))),
        })),
        "callTimeoutSeconds": num(s, "call_timeout_seconds"),
        "maxResultBytes": num(s, "max_result_bytes"),
        "maxTools": num(s, "max_tools"),
    })
}

/// An intent block's `tool` blocks as API JSON.
pub fn tools_json(intent: &Value) -> Vec<Json> {
    k::items(intent.get("tool"))
        .iter()
        .map(|t| {
            json!({
                "server": t.get("server").as_str(),
                "name": t.get("name").as_str(),
                "requiresApproval": t.get("requires_approval").as_bool().unwrap_or(false),
                "rateLimits": super::agent_policy::rate_limits_json(t),
            })
        })
        .collect()
}

/// Adds the policy-level agentic fields of `v` to the spec JSON `spec`.
pub fn insert_json(v: &Value, spec: &mut Json) {
    spec["mcpServers"] = k::items(v.get("mcp_server"))
        .iter()
        .map(server_json)
        .collect();
    spec["maxSteps"] = opt_num(v, "max_steps");
    spec["circuitBreaker"] = k::items(v.get("circuit_breaker"))
        .first()
        .map_or(Json::Null, |b| {
            json!({
                "windowSeconds": num(b, "window_seconds"),
                "failures": opt_num(b, "failures"),
                "failurePercent": opt_num(b, "failure_percent"),
                "spendMicros": opt_num(b, "spend_micros"),
                "minTasks": num(b, "min_tasks"),
            })
        });
    spec["rego"] = k::items(v.get("rego")).first().map_or(Json::Null, |r| {
        json!({
            "query": r.get("query").as_str().unwrap_or(DEFAULT_REGO_QUERY),
            "modules": k::items(r.get("module"))
                .iter()
                .map(|m| one_source_json(m, [("inline", "inline"), ("config_map_ref", "configMapRef")]))
                .collect::<Vec<_>>(),
        })
    });
    spec["edge"] = k::items(v.get("edge")).first().map_or(Json::Null, |e| {
        json!({ "regulated": e.get("regulated").as_str().unwrap_or(RegulatedRoute::default().as_str()) })
    });
}

fn obj<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn named_values_value(items: &[NamedValue]) -> Value {
    let value = |e: &NamedValue| {
        let secret = e.secret_ref.as_ref();
        one_source_value(
            &e.name,
            ("value", e.value.as_ref()),
            (
                "secret_ref",
                secret.map(|s| (s.name.as_str(), s.key.as_str())),
            ),
        )
    };
    Value::List(items.iter().map(value).collect())
}

/// An MCP server as a block value; `prior` (the same block in the prior state) decides the form
/// of an empty `args`.
fn server_value(s: &McpServer, prior: &Value) -> Value {
    let stdio = s.stdio.iter().map(|st| {
        obj([
            ("command", Value::string(st.command.as_str())),
            (
                "args",
                k::string_list(&st.args, nth(prior.get("stdio"), 0).get("args")),
            ),
            ("env", named_values_value(&st.env)),
        ])
    });
    let http = s.http.iter().map(|h| {
        obj([
            ("url", Value::string(h.url.as_str())),
            ("header", named_values_value(&h.headers)),
        ])
    });
    obj([
        ("name", Value::string(s.name.as_str())),
        ("stdio", Value::List(stdio.collect())),
        ("http", Value::List(http.collect())),
        (
            "call_timeout_seconds",
            Value::int(i64::from(s.call_timeout_seconds)),
        ),
        (
            "max_result_bytes",
            Value::int(i64::try_from(s.max_result_bytes).unwrap_or(i64::MAX)),
        ),
        ("max_tools", Value::int(i64::from(s.max_tools))),
    ])
}

/// An intent rule's tools as `tool` blocks.
pub fn tools_value(tools: &[ToolRule]) -> Value {
    Value::List(
        tools
            .iter()
            .map(|t| {
                obj([
                    ("server", Value::string(t.server.as_str())),
                    ("name", Value::string(t.name.as_str())),
                    ("requires_approval", Value::Bool(t.requires_approval)),
                    (
                        "rate_limit",
                        super::agent_policy::rate_limits_value(&t.rate_limits),
                    ),
                ])
            })
            .collect(),
    )
}

fn breaker_value(b: &CircuitBreaker) -> Value {
    obj([
        ("window_seconds", Value::int(i64::from(b.window_seconds))),
        ("failures", opt_int(b.failures)),
        ("failure_percent", opt_int(b.failure_percent)),
        (
            "spend_micros",
            opt_int(b.spend_micros.map(|s| i64::try_from(s).unwrap_or(i64::MAX))),
        ),
        ("min_tasks", Value::int(i64::from(b.min_tasks))),
    ])
}

fn rego_value(r: &RegoPolicy) -> Value {
    let modules = r.modules.iter().map(|m| {
        let source = m.config_map_ref.as_ref();
        one_source_value(
            &m.name,
            ("inline", m.inline.as_ref()),
            (
                "config_map_ref",
                source.map(|c| (c.name.as_str(), c.key.as_str())),
            ),
        )
    });
    obj([
        ("query", Value::string(r.query.as_str())),
        ("module", Value::List(modules.collect())),
    ])
}

/// Writes the policy-level agentic fields of `spec` into the state object `s`.
pub fn write_values(spec: &AgentPolicySpec, s: &mut Value, prior: &Value) {
    let servers = spec
        .mcp_servers
        .iter()
        .enumerate()
        .map(|(i, m)| server_value(m, &nth(prior.get("mcp_server"), i)))
        .collect();
    s.set("mcp_server", Value::List(servers));
    s.set("max_steps", opt_int(spec.max_steps));
    s.set(
        "circuit_breaker",
        Value::List(spec.circuit_breaker.iter().map(breaker_value).collect()),
    );
    s.set(
        "rego",
        Value::List(spec.rego.iter().map(rego_value).collect()),
    );
    let edge = spec
        .edge
        .iter()
        .map(|e| obj([("regulated", Value::string(enum_str(&e.regulated)))]));
    s.set("edge", Value::List(edge.collect()));
}

#[cfg(test)]
mod tests {
    use agentplane_api::policy::{EdgePolicy, RegoPolicy};

    use super::*;
    use crate::framework::Resource;
    use crate::framework::diag::Severity;
    use crate::resources::agent_policy::AgentPolicy;
    use crate::resources::agent_policy::tests::sample;

    /// Terraform's static checks plus the resource's own, as `validate`/`plan` run them: the
    /// (path, summary) of every error, and the warnings' details.
    fn check(v: &Value) -> (Vec<(String, String)>, Vec<String>) {
        let mut d = Diagnostics::new();
        AgentPolicy
            .schema()
            .block
            .validate_config(v, &AttrPath::root(), &mut d);
        AgentPolicy.validate(v, &mut d);
        let errors =
            d.0.iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| (d.path.as_ref().unwrap().to_string(), d.summary.clone()))
                .collect();
        let warnings =
            d.0.iter()
                .filter(|d| d.severity == Severity::Warning)
                .map(|d| d.detail.clone())
                .collect();
        (errors, warnings)
    }

    /// `f` applied to the item at `index` of the list `name` in `v`.
    fn edit(v: &mut Value, name: &str, index: usize, f: impl FnOnce(&mut Value)) {
        let Value::List(mut items) = v.get(name).clone() else {
            panic!("{name} is not a list")
        };
        f(&mut items[index]);
        v.set(name, Value::List(items));
    }

    #[test]
    fn the_full_sample_is_valid() {
        assert_eq!(check(&sample()), (vec![], vec![]));
    }

    #[test]
    fn crd_rules_are_refused_with_their_paths() {
        let mut v = sample();
        // Two transports; a second server with neither and the first one's name.
        edit(&mut v, "mcp_server", 0, |s| {
            let http = k::items(sample().get("mcp_server"))[1].get("http").clone();
            s.set("http", http);
        });
        edit(&mut v, "mcp_server", 1, |s| {
            edit(s, "http", 0, |h| {
                h.set("url", Value::string("http://search.example.com/mcp"));
                edit(h, "header", 0, |e| {
                    e.set("value", Value::string("Bearer x"))
                });
            });
            s.set("name", Value::string("Search_1"));
        });
        edit(&mut v, "circuit_breaker", 0, |b| {
            b.set("failures", Value::Null);
            b.set("spend_micros", Value::Null);
        });
        edit(&mut v, "rego", 0, |r| {
            r.set("query", Value::string("agentplane.decision"));
            edit(r, "module", 1, |m| {
                m.set("inline", Value::string("package x"))
            });
            edit(r, "module", 0, |m| m.set("inline", Value::Null));
        });
        edit(&mut v, "edge", 0, |e| {
            e.set("regulated", Value::string("bogus"))
        });
        edit(&mut v, "intent", 0, |i| i.set("max_steps", Value::int(257)));
        let (errors, _) = check(&v);
        let errors: Vec<(&str, &str)> = errors
            .iter()
            .map(|(p, s)| (p.as_str(), s.as_str()))
            .collect();
        assert_eq!(
            errors,
            vec![
                ("intent[0].max_steps", "Value out of range"),
                ("edge[0].regulated", "Invalid value"),
                ("mcp_server[0].http", "One MCP transport"),
                ("mcp_server[1].name", "Invalid MCP server name"),
                ("mcp_server[1].http[0].url", "Insecure MCP server URL"),
                (
                    "mcp_server[1].http[0].header[0].secret_ref",
                    "Value or secret_ref"
                ),
                (
                    "circuit_breaker[0].window_seconds",
                    "Circuit breaker without a trigger"
                ),
                ("rego[0].query", "Invalid Rego query"),
                ("rego[0].module[0].name", "One Rego module source"),
                ("rego[0].module[1].config_map_ref", "One Rego module source"),
            ]
        );
    }

    #[test]
    fn neither_transport_duplicates_and_limits() {
        let mut v = sample();
        edit(&mut v, "mcp_server", 1, |s| {
            s.set("http", Value::List(vec![]));
            s.set("name", Value::string("files"));
            s.set("max_result_bytes", Value::int(16_777_217));
        });
        edit(&mut v, "mcp_server", 0, |s| {
            edit(s, "stdio", 0, |st| {
                edit(st, "env", 1, |e| e.set("name", Value::string("TOKEN")));
                let args = vec![Value::string("a"); 65];
                st.set("args", Value::List(args));
            })
        });
        let (errors, warnings) = check(&v);
        let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "mcp_server[1].max_result_bytes",
                "mcp_server[1].name",
                "mcp_server[0].stdio[0].args",
                "mcp_server[0].stdio[0].env[1].name",
                "mcp_server[1].name",
            ]
        );
        // The tool's server is still declared (by the first block).
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_tool_of_an_undeclared_server_warns_and_unknowns_are_not_judged() {
        let mut v = sample();
        edit(&mut v, "intent", 0, |i| {
            edit(i, "tool", 0, |t| t.set("server", Value::string("fs")))
        });
        let (errors, warnings) = check(&v);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("intent[0].tool[0].server is \"fs\""));

        // Values known only at apply (another resource's attributes) are checked then.
        let mut v = sample();
        edit(&mut v, "mcp_server", 0, |s| s.set("stdio", Value::UNKNOWN));
        edit(&mut v, "mcp_server", 1, |s| {
            edit(s, "http", 0, |h| h.set("url", Value::UNKNOWN))
        });
        edit(&mut v, "circuit_breaker", 0, |b| {
            b.set("failures", Value::UNKNOWN);
            b.set("spend_micros", Value::Null);
        });
        assert_eq!(check(&v), (vec![], vec![]));
    }

    #[test]
    fn absent_blocks_leave_the_fields_out_and_read_back_empty() {
        let mut v = sample();
        for b in ["mcp_server", "circuit_breaker", "rego", "edge"] {
            v.set(b, Value::List(vec![]));
        }
        v.set("max_steps", Value::Null);
        edit(&mut v, "intent", 0, |i| {
            i.set("tool", Value::List(vec![]));
            i.set("max_steps", Value::Null);
        });
        let m = crate::resources::agent_policy::manifest(&v).unwrap();
        for f in ["mcpServers", "maxSteps", "circuitBreaker", "rego", "edge"] {
            assert!(m["spec"].get(f).is_none(), "{f}: {}", m["spec"]);
        }
        assert!(m["spec"]["intents"][0].get("tools").is_none());
        let spec = crate::resources::agent_policy::spec_from_value(&v).unwrap();
        let mut back = v.clone();
        crate::resources::agent_policy::spec_to_value(&spec, &mut back, &v);
        assert_eq!(back, v);
    }

    #[test]
    fn a_hand_edit_reads_back_as_drift_of_that_attribute() {
        let v = sample();
        let mut spec = crate::resources::agent_policy::spec_from_value(&v).unwrap();
        spec.mcp_servers[0].call_timeout_seconds = 600;
        spec.edge = Some(EdgePolicy {
            regulated: RegulatedRoute::Refuse,
        });
        let mut back = v.clone();
        crate::resources::agent_policy::spec_to_value(&spec, &mut back, &v);
        let server = &k::items(back.get("mcp_server"))[0];
        assert_eq!(server.get("call_timeout_seconds"), &Value::int(600));
        assert_eq!(
            k::items(back.get("edge"))[0].get("regulated"),
            &Value::string("refuse")
        );
        // Nothing else moved.
        let mut restored = back.clone();
        edit(&mut restored, "mcp_server", 0, |s| {
            s.set("call_timeout_seconds", Value::int(30))
        });
        restored.set("edge", v.get("edge").clone());
        assert_eq!(restored, v);
    }

    #[test]
    fn defaults_are_the_crds() {
        let block = mcp_server_block();
        let default = |b: &Block, name: &str| b.attribute(name).unwrap().default.clone().unwrap();
        let server: McpServer =
            serde_json::from_value(json!({"name": "x", "stdio": {"command": "c"}})).unwrap();
        assert_eq!(
            default(&block, "call_timeout_seconds"),
            Value::int(server.call_timeout_seconds.into())
        );
        assert_eq!(
            default(&block, "max_result_bytes"),
            Value::int(server.max_result_bytes as i64)
        );
        assert_eq!(
            default(&block, "max_tools"),
            Value::int(server.max_tools.into())
        );
        let breaker: CircuitBreaker =
            serde_json::from_value(json!({"windowSeconds": 1, "failures": 1})).unwrap();
        assert_eq!(
            default(&circuit_breaker_block(), "min_tasks"),
            Value::int(breaker.min_tasks.into())
        );
        let rego: RegoPolicy = serde_json::from_value(json!({"modules": []})).unwrap();
        assert_eq!(default(&rego_block(), "query"), Value::string(rego.query));
        let edge: EdgePolicy = serde_json::from_value(json!({})).unwrap();
        assert_eq!(
            default(&edge_block(), "regulated"),
            Value::string(edge.regulated.as_str())
        );
    }

    #[test]
    fn rego_query_pattern() {
        for ok in ["data.agentplane.decision", "data.a", "data._x.y9"] {
            assert!(is_data_path(ok), "{ok}");
        }
        for bad in [
            "data",
            "data.",
            "data..a",
            "data.9a",
            "agentplane.decision",
            "data.a-b",
        ] {
            assert!(!is_data_path(bad), "{bad}");
        }
    }
}
