//! Policy as code: the AgentPolicy's Rego modules (`spec.rego`), evaluated in-process with regorus.
//!
//! A [`RegoPolicies`] belongs to one component (the gateway, the controller) and keeps its compiled
//! policies by digest (SHA-256 of the query and the modules, [`digest`]), so each version of the
//! modules is compiled once, however many tasks it decides. A version that does not compile is
//! reported (a [`LoadReport`], which the operator writes to the AgentPolicy as the `RegoCompiled`
//! condition) and the version compiled before it stays in force; with none before it, decisions fail
//! closed. Evaluation gets a bounded input document ([`admission_input`], [`tool_call_input`]) and a
//! time limit, and its result must be the decision document `{"allow": bool, "require_approval":
//! bool, "reasons": [string]}` ([`CompiledRego::decide`]); anything else is an error, which callers
//! treat as a refusal.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_api::IntentPayload;
use agentplane_api::policy::{AgentPolicySpec, RegoDecisionKind, RegoPolicy, RegoVerdict};
use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// Longest one evaluation may run before it is abandoned as an error.
pub const EVAL_TIME_LIMIT: Duration = Duration::from_millis(250);
/// Bytes of the prompt the admission input carries (`intent.prompt`); `intent.promptBytes` is the
/// full length. A prompt may be up to 1 MiB; policies decide on its start and its size.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
/// Largest serialised input document: the largest signed payload (1 MiB), so every intent the
/// gateway accepts can be decided; a tool call's arguments beyond it are refused.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Most reasons kept from a decision, and the longest one (longer ones are cut at a char boundary).
pub const MAX_REASONS: usize = 16;
pub const MAX_REASON_BYTES: usize = 512;
/// Compiled versions kept besides the one in force (a policy flipping between versions recompiles
/// nothing).
const CACHED_VERSIONS: usize = 8;

/// The status condition type [`LoadReport::condition`] produces.
pub const CONDITION_REGO_COMPILED: &str = "RegoCompiled";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegoError {
    /// A module did not parse, or the modules did not compile together; regorus's message names the
    /// module and the line (`admission.rego:3:9: error: ...`).
    #[error("Rego policy does not compile: {0}")]
    Compile(String),
    #[error("Rego query {query:?} names no rule of the modules: {detail}")]
    NoRule { query: String, detail: String },
    #[error("Rego module {module:?}: {reason}")]
    Source { module: String, reason: String },
    #[error("Rego evaluation failed: {0}")]
    Eval(String),
    #[error("Rego evaluation exceeded its time limit of {0:?}")]
    TimeLimit(Duration),
    #[error("{query} is undefined for this input; give it a default (default decision := {{...}})")]
    Undefined { query: String },
    #[error(
        "{query} must be a decision object {{\"allow\": bool, \"require_approval\": bool, \"reasons\": [string]}}: {problem}"
    )]
    NotADecision { query: String, problem: String },
    #[error("the Rego input document is {size} bytes, over the {MAX_INPUT_BYTES}-byte limit")]
    InputTooLarge { size: usize },
    /// No version of the modules has compiled yet, so there is nothing to decide with.
    #[error("no version of the AgentPolicy's Rego modules has compiled ({0})")]
    Unavailable(Box<RegoError>),
}

impl RegoError {
    /// The refusal code a decision that failed with this error is reported under.
    pub fn code(&self) -> &'static str {
        "rego_error"
    }
}

/// One module's source, resolved (inline, or read from its ConfigMap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegoSource {
    pub name: String,
    pub text: String,
}

/// Where `configMapRef` modules are read from (the Kubernetes API in the cluster).
#[async_trait]
pub trait ConfigMapSource: Send + Sync {
    /// The value of `key` in ConfigMap `name` of the policy's namespace; `Ok(None)` when either is
    /// missing.
    async fn config_map_key(&self, name: &str, key: &str) -> Result<Option<String>, String>;
}

/// `configMapRef` modules read from the Kubernetes API, one GET per module per decision (a policy
/// that wants no API call on the admission path keeps its modules inline).
pub struct KubeConfigMaps(kube::Api<k8s_openapi::api::core::v1::ConfigMap>);

impl KubeConfigMaps {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        KubeConfigMaps(kube::Api::namespaced(client, namespace))
    }
}

#[async_trait]
impl ConfigMapSource for KubeConfigMaps {
    async fn config_map_key(&self, name: &str, key: &str) -> Result<Option<String>, String> {
        let cm = self.0.get_opt(name).await.map_err(|e| e.to_string())?;
        Ok(cm.and_then(|cm| cm.data?.get(key).cloned()))
    }
}

/// Writes each load report to the AgentPolicy `name` as its `RegoCompiled` status condition, until
/// the reports end (the [`RegoPolicies`] is dropped). A failed write is logged and the next report
/// written anyway: the condition is a view of the latest load, not a history.
pub async fn report_to_policy(
    api: kube::Api<agentplane_api::policy::AgentPolicy>,
    name: String,
    mut reports: tokio::sync::watch::Receiver<Option<LoadReport>>,
) {
    while reports.changed().await.is_ok() {
        let Some(report) = reports.borrow_and_update().clone() else {
            continue;
        };
        // A merge patch replaces the whole list; RegoCompiled is the only condition the runtime
        // sets on the policy.
        let patch = json!({ "status": { "conditions": [report.condition(Timestamp::now())] } });
        if let Err(e) = api
            .patch_status(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(policy = %name, error = %e, "could not record the Rego load on the AgentPolicy");
        }
    }
}

/// Loads the namespace's policy's modules every `every`, so a new version (an edited AgentPolicy or
/// ConfigMap) is compiled, and its failure reported, when it appears rather than at the next
/// decision. Runs until the task is aborted.
pub async fn keep_loaded(rego: Arc<RegoPolicies>, store: crate::store::DynStore, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.get_policy().await {
            // The outcome is in the load report; a failure was logged where it happened.
            Ok(policy) => drop(rego.current(policy.as_ref()).await),
            Err(e) => {
                tracing::warn!(error = %e, "reading the AgentPolicy to load its Rego modules")
            }
        }
    }
}

/// `sha256:<hex>` over the query and the modules in order, each string preceded by its length as
/// an 8-byte big-endian integer (so no two different module lists hash alike).
pub fn digest(query: &str, sources: &[RegoSource]) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    put(query);
    for s in sources {
        put(&s.name);
        put(&s.text);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// One compiled version of a policy's modules.
pub struct CompiledRego {
    digest: String,
    query: String,
    /// Prepared once (parsed, analysed, the query's rule resolved); each evaluation works on a
    /// clone, which shares the compiled modules.
    engine: regorus::Engine,
}

impl std::fmt::Debug for CompiledRego {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRego")
            .field("digest", &self.digest)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

impl CompiledRego {
    /// Parses and compiles `sources` together and checks `query` names one of their rules.
    pub fn compile(query: &str, sources: &[RegoSource]) -> Result<Self, RegoError> {
        let mut engine = regorus::Engine::new();
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: EVAL_TIME_LIMIT,
            check_interval: NonZeroU32::new(64).expect("non-zero"),
        });
        // A builtin given bad arguments (e.g. a number to `startswith`) is an error, not undefined:
        // a policy should not quietly allow because a check could not run.
        engine.set_strict_builtin_errors(true);
        for s in sources {
            engine
                .add_policy(s.name.clone(), s.text.clone())
                .map_err(|e| RegoError::Compile(one_line(&format!("{e:#}"))))?;
        }
        let rule: regorus::Rc<str> = query.into();
        engine
            .compile_with_entrypoint(&rule)
            .map_err(|e| classify_compile_error(query, e))?;
        Ok(CompiledRego {
            digest: digest(query, sources),
            query: query.to_owned(),
            engine,
        })
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Evaluates the query against `input` and reads the decision document.
    pub fn decide(&self, input: &Value) -> Result<RegoVerdict, RegoError> {
        let size = serde_json::to_vec(input)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_INPUT_BYTES {
            return Err(RegoError::InputTooLarge { size });
        }
        let mut engine = self.engine.clone();
        engine.set_input(regorus::Value::from(input.clone()));
        let value = engine
            .eval_rule(self.query.clone())
            .map_err(classify_eval_error)?;
        if value == regorus::Value::Undefined {
            return Err(RegoError::Undefined {
                query: self.query.clone(),
            });
        }
        let json: Value = serde_json::to_value(&value).map_err(|e| RegoError::NotADecision {
            query: self.query.clone(),
            problem: format!("not representable as JSON: {e}"),
        })?;
        read_decision(&self.query, &json).map(|(decision, reasons)| RegoVerdict {
            decision,
            reasons,
            digest: self.digest.clone(),
        })
    }
}

/// regorus's diagnostics are rustc-style (`--> file:line:col`, a source excerpt with a caret, then
/// `error: ...`); a status condition and an HTTP error want one line: `file:line:col: message`.
fn one_line(text: &str) -> String {
    let location = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-->"))
        .map(str::trim);
    let message = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("error:"))
        .map(str::trim);
    match (location, message) {
        (Some(at), Some(what)) => format!("{at}: {what}"),
        _ => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn classify_compile_error(query: &str, e: anyhow::Error) -> RegoError {
    let text = one_line(&format!("{e:#}"));
    // regorus reports a query that resolves to no rule as "not a valid rule path" / "not found".
    let lower = text.to_ascii_lowercase();
    if lower.contains("not a valid rule path")
        || lower.contains("rule path")
        || lower.contains("not found")
    {
        RegoError::NoRule {
            query: query.to_owned(),
            detail: text,
        }
    } else {
        RegoError::Compile(text)
    }
}

fn classify_eval_error(e: anyhow::Error) -> RegoError {
    if let Some(regorus::utils::limits::LimitError::TimeLimitExceeded { .. }) =
        e.downcast_ref::<regorus::utils::limits::LimitError>()
    {
        return RegoError::TimeLimit(EVAL_TIME_LIMIT);
    }
    let text = one_line(&format!("{e:#}"));
    if text.contains("execution exceeded time limit") || text.contains("TimeLimitExceeded") {
        return RegoError::TimeLimit(EVAL_TIME_LIMIT);
    }
    RegoError::Eval(text)
}

/// Reads `{"allow": bool, "require_approval": bool?, "reasons": [string]?}` (the value of `query`).
/// A denial wins over a request for approval. Public so a document from another evaluator (the
/// `opa` differential test) is read by the same rules.
pub fn read_decision(query: &str, v: &Value) -> Result<(RegoDecisionKind, Vec<String>), RegoError> {
    let bad = |problem: String| RegoError::NotADecision {
        query: query.to_owned(),
        problem,
    };
    let Value::Object(doc) = v else {
        return Err(bad(format!("got {}", kind_of(v))));
    };
    let allow = match doc.get("allow") {
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(bad(format!("\"allow\" is {}", kind_of(other)))),
        None => return Err(bad("\"allow\" is missing".into())),
    };
    let approval = match doc.get("require_approval") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(format!("\"require_approval\" is {}", kind_of(other))));
        }
    };
    let reasons = match doc.get("reasons") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|r| match r {
                Value::String(s) => Ok(bounded(s)),
                other => Err(bad(format!("a reason is {}", kind_of(other)))),
            })
            .take(MAX_REASONS)
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(bad(format!("\"reasons\" is {}", kind_of(other)))),
    };
    let kind = match (allow, approval) {
        (false, _) => RegoDecisionKind::Deny,
        (true, true) => RegoDecisionKind::RequireApproval,
        (true, false) => RegoDecisionKind::Allow,
    };
    Ok((kind, reasons))
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_REASON_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_REASON_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The input document for an admission: what the signed intent says (the prompt cut to
/// [`MAX_PROMPT_BYTES`]).
pub fn admission_input(namespace: &str, payload: &IntentPayload) -> Value {
    let prompt = &payload.intent.prompt;
    let mut end = prompt.len().min(MAX_PROMPT_BYTES);
    while !prompt.is_char_boundary(end) {
        end -= 1;
    }
    json!({
        "kind": "admission",
        "namespace": namespace,
        "task": { "id": payload.task_id },
        "device": { "id": payload.device_id, "seq": payload.seq },
        "user": { "id": payload.user_id },
        "intent": {
            "type": payload.intent.kind,
            "prompt": &prompt[..end],
            "promptBytes": prompt.len(),
            "params": payload.intent.params,
        },
        "privacyLevel": payload.privacy_level,
        "requiredResources": payload.required_resources,
        "consent": { "scopes": payload.consent.scopes },
    })
}

/// A tool call a plan is about to make.
#[derive(Clone, Debug)]
pub struct ToolCall<'a> {
    pub namespace: &'a str,
    pub intent_type: &'a str,
    pub server: &'a str,
    pub tool: &'a str,
    pub arguments: &'a serde_json::Map<String, Value>,
    pub task_id: &'a str,
    pub step: u32,
}

/// The input document for a tool call (over [`MAX_INPUT_BYTES`] with its arguments: an error).
pub fn tool_call_input(call: &ToolCall<'_>) -> Value {
    json!({
        "kind": "tool_call",
        "namespace": call.namespace,
        "task": { "id": call.task_id, "step": call.step },
        "intent": { "type": call.intent_type },
        "tool": { "server": call.server, "name": call.tool, "arguments": call.arguments },
    })
}

/// What loading a version of the modules came to, for the AgentPolicy's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The version that was loaded.
    pub digest: String,
    /// Why it did not compile (absent: it compiled and is in force).
    pub error: Option<RegoError>,
    /// The version deciding now.
    pub in_force: Option<String>,
}

impl LoadReport {
    /// The `RegoCompiled` condition for the AgentPolicy's status.
    pub fn condition(&self, now: Timestamp) -> Condition {
        let (status, reason, message) = match &self.error {
            None => (
                "True",
                "Compiled",
                format!("Rego modules {} compiled and in force", self.digest),
            ),
            Some(e) => (
                "False",
                "CompileError",
                format!(
                    "{e} (version {}); {}",
                    self.digest,
                    match &self.in_force {
                        Some(d) => format!("version {d} stays in force"),
                        None =>
                            "no version is in force: admissions and tool calls are refused".into(),
                    }
                ),
            ),
        };
        Condition {
            type_: CONDITION_REGO_COMPILED.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Time(now),
            observed_generation: None,
        }
    }
}

#[derive(Default)]
struct State {
    in_force: Option<Arc<CompiledRego>>,
    cache: VecDeque<Arc<CompiledRego>>,
    /// The last version that failed, so it is not recompiled on every decision.
    failed: Option<(String, RegoError)>,
}

/// One component's compiled Rego policies (see the module docs).
pub struct RegoPolicies {
    config_maps: Option<Arc<dyn ConfigMapSource>>,
    state: Mutex<State>,
    reports: tokio::sync::watch::Sender<Option<LoadReport>>,
}

impl Default for RegoPolicies {
    fn default() -> Self {
        Self::new(None)
    }
}

impl RegoPolicies {
    /// `config_maps` reads `configMapRef` modules; without it (the embedded runtime, which has no
    /// ConfigMaps) such a module is an error naming it.
    pub fn new(config_maps: Option<Arc<dyn ConfigMapSource>>) -> Self {
        RegoPolicies {
            config_maps,
            state: Mutex::new(State::default()),
            reports: tokio::sync::watch::channel(None).0,
        }
    }

    /// Every load of a new version (compiled or not), latest first.
    pub fn reports(&self) -> tokio::sync::watch::Receiver<Option<LoadReport>> {
        self.reports.subscribe()
    }

    /// The modules' sources, read from their ConfigMaps where they are not inline.
    pub async fn resolve(&self, rego: &RegoPolicy) -> Result<Vec<RegoSource>, RegoError> {
        let mut out = Vec::with_capacity(rego.modules.len());
        for m in &rego.modules {
            let source_err = |reason: String| RegoError::Source {
                module: m.name.clone(),
                reason,
            };
            let text = match (&m.inline, &m.config_map_ref) {
                (Some(text), None) => text.clone(),
                (None, Some(r)) => {
                    let Some(cms) = &self.config_maps else {
                        return Err(source_err(format!(
                            "configMapRef {}/{} needs the Kubernetes runtime; the embedded runtime reads inline modules only",
                            r.name, r.key
                        )));
                    };
                    cms.config_map_key(&r.name, &r.key)
                        .await
                        .map_err(|e| source_err(format!("reading ConfigMap {:?}: {e}", r.name)))?
                        .ok_or_else(|| {
                            source_err(format!("ConfigMap {:?} has no key {:?}", r.name, r.key))
                        })?
                }
                _ => {
                    return Err(source_err(
                        "set exactly one of inline and configMapRef".into(),
                    ));
                }
            };
            out.push(RegoSource {
                name: m.name.clone(),
                text,
            });
        }
        Ok(out)
    }

    /// Makes the version `sources` the one in force if it compiles; otherwise keeps the one in force.
    /// Returns the version deciding now and, if this version failed, why.
    pub fn load(
        &self,
        query: &str,
        sources: &[RegoSource],
    ) -> (Option<Arc<CompiledRego>>, Option<RegoError>) {
        let wanted = digest(query, sources);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = state.in_force.as_ref().filter(|p| p.digest == wanted) {
            return (Some(p.clone()), None);
        }
        if let Some(p) = state.cache.iter().find(|p| p.digest == wanted).cloned() {
            state.in_force = Some(p.clone());
            drop(state);
            self.report(&wanted, None, Some(wanted.clone()));
            return (Some(p), None);
        }
        if let Some((d, e)) = &state.failed
            && *d == wanted
        {
            return (state.in_force.clone(), Some(e.clone()));
        }
        // Compiling under the lock keeps one compile per version; a policy change is rare.
        match CompiledRego::compile(query, sources) {
            Ok(p) => {
                let p = Arc::new(p);
                state.cache.push_front(p.clone());
                state.cache.truncate(CACHED_VERSIONS);
                state.in_force = Some(p.clone());
                state.failed = None;
                drop(state);
                tracing::info!(digest = %wanted, "Rego policy compiled and in force");
                self.report(&wanted, None, Some(wanted.clone()));
                (Some(p), None)
            }
            Err(e) => {
                state.failed = Some((wanted.clone(), e.clone()));
                let in_force = state.in_force.clone();
                drop(state);
                tracing::error!(digest = %wanted, error = %e, in_force = ?in_force.as_ref().map(|p| &p.digest), "Rego policy does not compile; the previous version stays in force");
                self.report(
                    &wanted,
                    Some(e.clone()),
                    in_force.as_ref().map(|p| p.digest.clone()),
                );
                (in_force, Some(e))
            }
        }
    }

    fn report(&self, digest: &str, error: Option<RegoError>, in_force: Option<String>) {
        self.reports.send_replace(Some(LoadReport {
            digest: digest.to_owned(),
            error,
            in_force,
        }));
    }

    /// The compiled version to decide with under `policy`: `None` when it has no `rego`; an error
    /// when no version has ever compiled (callers refuse: fail closed).
    pub async fn current(
        &self,
        policy: Option<&AgentPolicySpec>,
    ) -> Result<Option<Arc<CompiledRego>>, RegoError> {
        let Some(rego) = policy.and_then(|p| p.rego.as_ref()) else {
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .in_force = None;
            return Ok(None);
        };
        let (compiled, error) = match self.resolve(rego).await {
            Ok(sources) => self.load(&rego.query, &sources),
            // An unreadable module is a version that did not load: the one in force stays.
            Err(e) => {
                let in_force = self
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .in_force
                    .clone();
                tracing::error!(error = %e, "Rego module unreadable; the previous version stays in force");
                (in_force, Some(e))
            }
        };
        match (compiled, error) {
            (Some(p), _) => Ok(Some(p)),
            (None, e) => Err(RegoError::Unavailable(Box::new(e.unwrap_or_else(|| {
                // `load` returns a version or an error; stay closed should that ever change.
                RegoError::Eval("no version of the modules is loaded".into())
            })))),
        }
    }

    /// The Rego verdict on an admission, `None` when the policy has no Rego modules.
    pub async fn decide_admission(
        &self,
        policy: Option<&AgentPolicySpec>,
        namespace: &str,
        payload: &IntentPayload,
    ) -> Result<Option<RegoVerdict>, RegoError> {
        match self.current(policy).await? {
            None => Ok(None),
            Some(p) => p.decide(&admission_input(namespace, payload)).map(Some),
        }
    }

    /// The Rego verdict on a tool call a plan is about to make, `None` when the policy has no Rego
    /// modules. The tool gate calls this after the allow-list, rate limit and `requiresApproval`
    /// checks let the call through: `Deny` refuses it (an error result to the model),
    /// `RequireApproval` parks the step as a tool rule's `requiresApproval` does, and an error is a
    /// refusal naming it.
    pub async fn decide_tool_call(
        &self,
        policy: Option<&AgentPolicySpec>,
        call: &ToolCall<'_>,
    ) -> Result<Option<RegoVerdict>, RegoError> {
        match self.current(policy).await? {
            None => Ok(None),
            Some(p) => p.decide(&tool_call_input(call)).map(Some),
        }
    }
}

/// Consults the Rego modules about a task the built-in rules admit (or park for approval): a Rego
/// denial denies it (`rego_denied`, with the policy's reasons), `require_approval` parks it in
/// AwaitingApproval on the tier already chosen, and an evaluation error denies it (`rego_error`:
/// fail closed). Built-in refusals and holds are returned as they are, without asking Rego. The
/// verdict, when Rego decided, is what the task's status and audit leaf record.
pub async fn apply_to_admission(
    rego: &RegoPolicies,
    policy: Option<&AgentPolicySpec>,
    namespace: &str,
    payload: &IntentPayload,
    decision: super::Decision,
) -> (super::Decision, Option<RegoVerdict>) {
    use super::Decision;
    let tier = match &decision {
        Decision::Admit(t) | Decision::AwaitApproval(t) => t.clone(),
        Decision::Hold { .. } | Decision::Deny { .. } => return (decision, None),
    };
    match rego.decide_admission(policy, namespace, payload).await {
        Ok(None) => (decision, None),
        Ok(Some(v)) => match v.decision {
            RegoDecisionKind::Allow => (decision, Some(v)),
            RegoDecisionKind::RequireApproval => (Decision::AwaitApproval(tier), Some(v)),
            RegoDecisionKind::Deny => (
                Decision::Deny {
                    code: "rego_denied",
                    reason: denial_message(&v),
                },
                Some(v),
            ),
        },
        Err(e) => (
            Decision::Deny {
                code: e.code(),
                reason: e.to_string(),
            },
            None,
        ),
    }
}

/// A refusal of an admission for the gateway: `(code, message)` when Rego denies or cannot decide.
pub async fn admission_refusal(
    rego: &RegoPolicies,
    policy: Option<&AgentPolicySpec>,
    namespace: &str,
    payload: &IntentPayload,
) -> Option<(&'static str, String)> {
    match rego.decide_admission(policy, namespace, payload).await {
        Ok(Some(v)) if v.decision == RegoDecisionKind::Deny => {
            Some(("rego_denied", denial_message(&v)))
        }
        Ok(_) => None,
        Err(e) => Some((e.code(), e.to_string())),
    }
}

/// "denied by Rego policy sha256:…: reason; reason".
pub fn denial_message(v: &RegoVerdict) -> String {
    if v.reasons.is_empty() {
        format!("denied by Rego policy {} (no reason given)", v.digest)
    } else {
        format!(
            "denied by Rego policy {}: {}",
            v.digest,
            v.reasons.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
package agentplane
import rego.v1

default decision := {"allow": true, "require_approval": false, "reasons": []}

decision := {"allow": false, "reasons": [sprintf("intent %s is blocked", [input.intent.type])]} if {
    input.intent.type == "delete-everything"
}

decision := {"allow": true, "require_approval": true, "reasons": ["purchases need a human"]} if {
    input.intent.type == "purchase"
}
"#;

    fn src(name: &str, text: &str) -> Vec<RegoSource> {
        vec![RegoSource {
            name: name.into(),
            text: text.into(),
        }]
    }

    fn input(kind: &str) -> Value {
        json!({"kind": "admission", "intent": {"type": kind}})
    }

    #[test]
    fn decides_allow_deny_and_approval_with_reasons_and_digest() {
        let p = CompiledRego::compile(DEFAULT_QUERY, &src("a.rego", GOOD)).unwrap();
        assert!(p.digest().starts_with("sha256:") && p.digest().len() == 71);
        let v = p.decide(&input("summarize")).unwrap();
        assert_eq!(v.decision, RegoDecisionKind::Allow);
        let v = p.decide(&input("delete-everything")).unwrap();
        assert_eq!(v.decision, RegoDecisionKind::Deny);
        assert_eq!(v.reasons, ["intent delete-everything is blocked"]);
        assert_eq!(v.digest, p.digest());
        let v = p.decide(&input("purchase")).unwrap();
        assert_eq!(v.decision, RegoDecisionKind::RequireApproval);
    }

    const DEFAULT_QUERY: &str = agentplane_api::policy::DEFAULT_REGO_QUERY;

    #[test]
    fn the_digest_covers_query_names_and_sources() {
        let a = digest(DEFAULT_QUERY, &src("a.rego", GOOD));
        assert_eq!(a, digest(DEFAULT_QUERY, &src("a.rego", GOOD)));
        assert_ne!(a, digest(DEFAULT_QUERY, &src("b.rego", GOOD)));
        assert_ne!(a, digest("data.agentplane.other", &src("a.rego", GOOD)));
        assert_ne!(
            a,
            digest(DEFAULT_QUERY, &src("a.rego", &format!("{GOOD}\n")))
        );
    }

    #[test]
    fn rego_that_does_not_parse_names_the_module_and_line() {
        let bad = "package agentplane\nimport rego.v1\n\ndecision := {\"allow\": true\n";
        let e = CompiledRego::compile(DEFAULT_QUERY, &src("broken.rego", bad)).unwrap_err();
        let RegoError::Compile(msg) = &e else {
            panic!("{e:?}")
        };
        // One line: where, then what (the object opened on line 4 is still open at the end, 5:1).
        assert_eq!(msg, "broken.rego:5:1: expecting `}` while parsing object");
    }

    #[test]
    fn a_module_without_the_queried_rule_is_refused_at_load() {
        let other = "package agentplane\nimport rego.v1\n\nverdict := {\"allow\": true}\n";
        let e = CompiledRego::compile(DEFAULT_QUERY, &src("other.rego", other)).unwrap_err();
        assert!(
            matches!(e, RegoError::NoRule { .. } | RegoError::Compile(_)),
            "{e:?}"
        );
        assert!(e.to_string().contains("decision"), "{e}");
    }

    #[test]
    fn results_that_are_not_decisions_are_errors() {
        for (body, expect) in [
            ("decision := true", "got a boolean"),
            ("decision := \"yes\"", "got a string"),
            ("decision := {\"allow\": \"yes\"}", "\"allow\" is a string"),
            (
                "decision := {\"require_approval\": true}",
                "\"allow\" is missing",
            ),
            (
                "decision := {\"allow\": true, \"reasons\": [1]}",
                "a reason is a number",
            ),
            (
                "decision := {\"allow\": true, \"require_approval\": 1}",
                "\"require_approval\" is a number",
            ),
        ] {
            let text = format!("package agentplane\nimport rego.v1\n\n{body}\n");
            let p = CompiledRego::compile(DEFAULT_QUERY, &src("x.rego", &text)).unwrap();
            let e = p.decide(&input("summarize")).unwrap_err();
            assert!(
                matches!(&e, RegoError::NotADecision { problem, .. } if problem.contains(expect)),
                "{body}: {e:?}"
            );
        }
        // Undefined for this input: no default.
        let text =
            "package agentplane\nimport rego.v1\n\ndecision := {\"allow\": true} if input.never\n";
        let p = CompiledRego::compile(DEFAULT_QUERY, &src("x.rego", text)).unwrap();
        assert!(matches!(
            p.decide(&input("summarize")),
            Err(RegoError::Undefined { .. })
        ));
    }

    #[test]
    fn an_evaluation_over_the_time_limit_is_an_error() {
        // 25 million iterations of a nested comprehension over small arrays (little memory): far
        // beyond the limit, never a hang or a panic.
        let text = r#"package agentplane
import rego.v1

n := count([1 | some x in numbers.range(1, 5000); some y in numbers.range(1, 5000); (x + y) % 7 == 0])
decision := {"allow": n > 0}
"#;
        let p = CompiledRego::compile(DEFAULT_QUERY, &src("slow.rego", text)).unwrap();
        let started = std::time::Instant::now();
        let e = p.decide(&input("summarize")).unwrap_err();
        assert!(matches!(e, RegoError::TimeLimit(_)), "{e:?}");
        // Abandoned near the limit, not after the full loop (a loose bound: a shared machine).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn oversized_inputs_are_refused_before_evaluation() {
        let p = CompiledRego::compile(DEFAULT_QUERY, &src("a.rego", GOOD)).unwrap();
        let big =
            json!({"kind": "tool_call", "tool": {"arguments": {"x": "y".repeat(MAX_INPUT_BYTES)}}});
        assert!(matches!(
            p.decide(&big),
            Err(RegoError::InputTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_bad_version_is_reported_and_the_previous_one_stays_in_force() {
        let rego = RegoPolicies::default();
        let mut reports = rego.reports();
        let (good, err) = rego.load(DEFAULT_QUERY, &src("policy.rego", GOOD));
        let good = good.unwrap();
        assert!(err.is_none());
        let report = reports.borrow_and_update().clone().unwrap();
        assert_eq!(report.condition(Timestamp::now()).status, "True");

        let bad = src("policy.rego", "package agentplane\n\ndecision := {\n");
        let (in_force, err) = rego.load(DEFAULT_QUERY, &bad);
        assert!(matches!(err, Some(RegoError::Compile(_))), "{err:?}");
        assert_eq!(in_force.unwrap().digest(), good.digest());
        let report = reports.borrow_and_update().clone().unwrap();
        let c = report.condition(Timestamp::now());
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "CompileError")
        );
        assert!(c.message.contains("policy.rego:"), "{}", c.message);
        assert!(
            c.message
                .contains(&format!("version {} stays in force", good.digest())),
            "{}",
            c.message
        );
        // Decisions are still the good version's.
        let v = in_force_decide(&rego, &bad, "delete-everything");
        assert_eq!(
            (v.decision, v.digest),
            (RegoDecisionKind::Deny, good.digest().to_owned())
        );
        // The bad version is not recompiled (nor reported again) on every decision.
        let _ = rego.load(DEFAULT_QUERY, &bad);
        assert!(!reports.has_changed().unwrap());
    }

    fn in_force_decide(rego: &RegoPolicies, sources: &[RegoSource], kind: &str) -> RegoVerdict {
        let (p, _) = rego.load(DEFAULT_QUERY, sources);
        p.unwrap().decide(&input(kind)).unwrap()
    }

    #[tokio::test]
    async fn with_no_version_ever_compiled_decisions_fail_closed() {
        use agentplane_api::policy::{RegoModule, RegoPolicy};
        let rego = RegoPolicies::default();
        let policy = AgentPolicySpec {
            rego: Some(RegoPolicy {
                modules: vec![RegoModule {
                    name: "p.rego".into(),
                    inline: Some("package agentplane\n\ndecision := {\n".into()),
                    config_map_ref: None,
                }],
                query: DEFAULT_QUERY.into(),
            }),
            ..Default::default()
        };
        let e = rego.current(Some(&policy)).await.unwrap_err();
        assert!(matches!(e, RegoError::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains("p.rego:"), "{e}");
        // A ConfigMap module without a Kubernetes runtime names the module.
        let mut cm = policy.clone();
        cm.rego.as_mut().unwrap().modules[0] = RegoModule {
            name: "cm.rego".into(),
            inline: None,
            config_map_ref: Some(agentplane_api::policy::ConfigMapKeyRef {
                name: "policies".into(),
                key: "cm.rego".into(),
            }),
        };
        let e = rego.current(Some(&cm)).await.unwrap_err();
        assert!(e.to_string().contains("\"cm.rego\""), "{e}");
        // No rego at all: nothing to decide.
        assert!(
            rego.current(Some(&AgentPolicySpec::default()))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn tool_call_inputs_carry_the_call() {
        let args = serde_json::Map::from_iter([("path".to_owned(), json!("/etc/passwd"))]);
        let call = ToolCall {
            namespace: "ns",
            intent_type: "summarize",
            server: "fs",
            tool: "read_file",
            arguments: &args,
            task_id: "t1",
            step: 3,
        };
        let text = r#"package agentplane
import rego.v1

default decision := {"allow": true}
decision := {"allow": false, "reasons": [sprintf("%s/%s may not read %s", [input.tool.server, input.tool.name, input.tool.arguments.path])]} if {
    input.kind == "tool_call"
    startswith(input.tool.arguments.path, "/etc/")
}
"#;
        let p = CompiledRego::compile(DEFAULT_QUERY, &src("tools.rego", text)).unwrap();
        let v = p.decide(&tool_call_input(&call)).unwrap();
        assert_eq!(v.decision, RegoDecisionKind::Deny);
        assert_eq!(v.reasons, ["fs/read_file may not read /etc/passwd"]);
    }
}
