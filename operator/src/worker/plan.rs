//! The plan loop: a task whose intent rule allows tools runs as model turn -> tool calls -> model
//! turn ... until the model answers or `maxSteps` is reached.
//!
//! Every step (a model turn or one tool call) is a row of the [`StepJournal`], numbered from 1 in the
//! order the plan takes them, written *before* the step runs and finished after. An attempt walks
//! the steps from 1: a finished row is replayed into the conversation without running anything
//! again, so a worker killed mid-plan resumes at the first unfinished step and never repeats a
//! finished tool call. A row begun but not finished is run again under the same idempotency key
//! (task id + step, in the MCP call's `_meta` and the model call's `Idempotency-Key`): exactly-once
//! for that one step then rests on the tool server honouring the key (see docs/architecture.md).
//!
//! Before every step the task and the namespace's policy are read again: a cancel request ends the
//! plan Cancelled, `suspend` hands the task back to the queue (phase Queued) with its finished steps
//! kept, and the allow-list, rate limits and `maxSteps` in force are the current ones. A tool call the
//! gate refuses goes back to the model as an error result; one that needs a human parks the task in
//! AwaitingApproval at that step, and the approved call runs with exactly the approved arguments.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use agentplane_api::TaskPhase;
use agentplane_api::policy::{AgentPolicySpec, ModelTier, RegoDecisionKind};
use agentplane_api::task::{
    AgentTaskStatus, ApprovalDecision, PendingApproval, PlanStep, StepKind, StepOutcome, Usage,
    args_digest,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{Handled, Worker, WorkerError};
use crate::mcp::{McpError, McpSession};
use crate::models::plan::{
    Conversation, Message, ToolCall, ToolSpec, Turn, model_tool_name, split_model_tool_name,
};
use crate::models::{ModelCall, ModelError, idempotency_key, tool_idempotency_key};
use crate::policy::ledger::Subject;
use crate::policy::rego::{self, RegoPolicies};
use crate::policy::tools::{ToolCallLog, ToolDecision};
use crate::queue::{ATTR_TRACEPARENT, Delivery};
use crate::secrets::SecretSource;
use crate::store::journal::{Begun, JournalEntry, StepEnd, StepJournal};
use crate::store::{StoreError, TaskRecord, write_status};
use crate::telemetry;

/// Longest step name kept in `status.steps` (the schema's limit).
const MAX_STEP_NAME: usize = 200;
/// Longest error text kept on a step (the schema's limit).
const MAX_STEP_ERROR: usize = 1024;

/// What a worker needs to run plans. `Default` is a worker without a step journal (a test's bare
/// worker): it runs tasks whose intents allow no tools as before and fails those that do, saying why.
#[derive(Default)]
pub struct PlanSupport {
    /// Where steps are journaled; `None` when this backend has no journal.
    pub journal: Option<Arc<dyn StepJournal>>,
    /// Resolves the `secretRef`s of MCP servers' env and headers.
    pub secrets: Option<Arc<dyn SecretSource>>,
    /// The per-tool rate-limit windows (this worker's calls).
    gate: Mutex<ToolCallLog>,
    /// The policy's Rego modules, compiled once per version, consulted after the gate lets a call
    /// through.
    pub rego: RegoPolicies,
}

impl PlanSupport {
    pub fn new(
        journal: Option<Arc<dyn StepJournal>>,
        secrets: Option<Arc<dyn SecretSource>>,
    ) -> PlanSupport {
        PlanSupport {
            journal,
            secrets,
            gate: Mutex::default(),
            rego: RegoPolicies::default(),
        }
    }
}

/// Whether tasks of `intent` run as plans: their rule allows at least one tool.
pub fn has_tools(policy: &AgentPolicySpec, intent: &str) -> bool {
    policy.rule_for(intent).is_some_and(|r| !r.tools.is_empty())
}

/// The signed intent's prompt and params, as the plan's first message.
pub struct Prompt {
    pub text: String,
    pub params: Map<String, Value>,
}

/// Why a plan stopped before an answer.
enum Stop {
    /// The task fails for good with this reason.
    Fail(String),
    /// This attempt failed; redelivery retries it (the unfinished step is re-run under its key).
    Retry(String),
    /// Cancel requested: end Cancelled.
    Cancel,
    /// The namespace is suspended: hand the task back before step `0`.
    Suspend(u32),
    /// Parked in AwaitingApproval (already written).
    Parked,
    /// Interrupted (lease lost, task finished or changed elsewhere): settle from the store.
    Settle,
}

/// What an MCP session failure means for the attempt: a transient one (connect, crash, timeout)
/// is retried by redelivery; one that fails the same way every time (a missing secret, too many
/// tools, a protocol violation) fails the task with it as the reason.
fn mcp_stop(e: McpError) -> Stop {
    if e.is_transient() {
        Stop::Retry(e.to_string())
    } else {
        Stop::Fail(e.to_string())
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Stop::Settle,
            e => Stop::Retry(format!("store: {e}")),
        }
    }
}

/// One attempt at a plan.
struct PlanRun<'a> {
    worker: &'a Worker,
    journal: Arc<dyn StepJournal>,
    /// The task as last read or written by this attempt (its version is the one writes depend on).
    task: TaskRecord,
    tier: ModelTier,
    policy: AgentPolicySpec,
    prompt: Prompt,
    traceparent: Option<String>,
    stop: CancellationToken,
    /// Journaled steps, by index.
    rows: BTreeMap<u32, JournalEntry>,
    sessions: HashMap<String, McpSession>,
    tools: Vec<ToolSpec>,
    conversation: Conversation,
    /// The step about to run.
    step: u32,
}

impl Worker {
    /// Runs (or resumes) the plan of a Running task.
    pub(super) async fn run_plan(
        &self,
        d: &Delivery,
        running: TaskRecord,
        tier: ModelTier,
        policy: AgentPolicySpec,
        prompt: Prompt,
    ) -> Result<Handled, WorkerError> {
        let Some(journal) = self.plans.journal.clone() else {
            let reason = "intent allows tools, but this worker was built without a step journal \
                          to run plans with";
            return self.fail(d, &running, reason).await;
        };
        let stop = CancellationToken::new();
        let heartbeat = self.start_heartbeat(d, &running.id, &stop);
        let traceparent = d
            .attributes
            .get(ATTR_TRACEPARENT)
            .and_then(|tp| telemetry::trace_id_in(tp))
            .or_else(|| running.status.trace_id.clone());
        let mut run = PlanRun {
            worker: self,
            journal,
            conversation: Conversation {
                messages: vec![Message::User(prompt.text.clone())],
            },
            task: running,
            tier,
            policy,
            prompt,
            traceparent,
            stop,
            rows: BTreeMap::new(),
            sessions: HashMap::new(),
            tools: Vec::new(),
            step: 1,
        };
        let span = tracing::info_span!("worker.plan", task = %run.task.id);
        let ended = run.run().instrument(span).await;
        heartbeat.abort();
        for (_, session) in run.sessions.drain() {
            session.close().await;
        }
        let task = run.task.clone();
        match ended {
            Ok(answer) => {
                let usage = run.usage();
                let steps = run.summaries();
                self.succeed(d, &task, answer, usage, steps).await
            }
            Err(Stop::Fail(reason)) => self.fail(d, &run.with_progress(), &reason).await,
            Err(Stop::Retry(reason)) => self.retry(d, &run.with_progress(), &reason).await,
            Err(Stop::Cancel) => {
                self.cancel(&task).await?;
                self.delete_quietly(&d.lease).await;
                Ok(Handled::Dropped)
            }
            Err(Stop::Suspend(step)) => self.hand_back_suspended(d, &run, step).await,
            // The approval, when it comes, sends a new message through the controller.
            Err(Stop::Parked) => {
                self.delete_quietly(&d.lease).await;
                Ok(Handled::Parked)
            }
            Err(Stop::Settle) => self.settle_after_stop(d, &task.id).await,
        }
    }

    /// Suspend semantics for a running plan: the task goes back to Queued with its finished steps
    /// kept and the message back to the queue, which the consumers do not read while suspended; once
    /// `suspend` is cleared, a worker takes it again and the plan resumes at step `step`.
    async fn hand_back_suspended(
        &self,
        d: &Delivery,
        run: &PlanRun<'_>,
        step: u32,
    ) -> Result<Handled, WorkerError> {
        let task = run.with_progress();
        let status = AgentTaskStatus {
            phase: Some(TaskPhase::Queued),
            reason: Some(format!(
                "suspended before step {step}; the plan resumes there when the AgentPolicy's suspend is cleared"
            )),
            ..task.status.clone()
        };
        match write_status(&*self.store, &task, status).await {
            Ok(_) => {
                tracing::info!(task = %task.id, step, "plan suspended");
                match self.queue.release(&d.lease, self.config.wait).await {
                    Ok(()) | Err(crate::queue::QueueError::LeaseExpired(_)) => {
                        Ok(Handled::Suspended)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(StoreError::Conflict { .. }) => self.settle_after_stop(d, &task.id).await,
            Err(e) => Err(e.into()),
        }
    }
}

impl PlanRun<'_> {
    async fn run(&mut self) -> Result<String, Stop> {
        for row in self.journal.steps(&self.task.id).await? {
            self.rows.insert(row.step, row);
        }
        self.checkpoint().await?;
        self.offer_tools().await?;
        loop {
            self.checkpoint().await?;
            let span = tracing::info_span!("plan.step", step = self.step, kind = "model");
            let turn = self.model_step().instrument(span).await?;
            self.step += 1;
            let (text, calls) = match turn {
                Turn::Answer { text } => return Ok(text),
                Turn::ToolCalls { text, calls } => (text, calls),
            };
            self.conversation.messages.push(Message::Assistant {
                text,
                calls: calls.clone(),
            });
            for call in &calls {
                self.checkpoint().await?;
                let span = tracing::info_span!("plan.step", step = self.step, kind = "tool", tool = %call.name);
                let (content, is_error) = self.tool_step(call).instrument(span).await?;
                self.conversation.messages.push(Message::ToolResult {
                    call_id: call.id.clone(),
                    content,
                    is_error,
                });
                self.step += 1;
            }
        }
    }

    /// The kill switch and the step budget, read again before every step.
    async fn checkpoint(&mut self) -> Result<(), Stop> {
        if self.stop.is_cancelled() {
            return Err(Stop::Settle);
        }
        let store = &self.worker.store;
        let Some(task) = store.get_task(&self.task.id).await? else {
            return Err(Stop::Settle);
        };
        // Finished, parked or handed back elsewhere: not this attempt's to run any more.
        if task.phase() != TaskPhase::Running {
            return Err(Stop::Settle);
        }
        if task.spec.cancel_requested() {
            self.task = task;
            return Err(Stop::Cancel);
        }
        self.task = task;
        let policy = store.get_policy().await?.unwrap_or_default();
        if policy.suspend {
            return Err(Stop::Suspend(self.step));
        }
        self.policy = policy;
        let max = self.policy.max_steps_for(&self.task.spec.intent_type);
        if self.step > max {
            return Err(Stop::Fail(format!(
                "the plan reached maxSteps ({max}) without a final answer"
            )));
        }
        Ok(())
    }

    /// Connects to every server the intent's allow-list names and offers the model exactly the
    /// listed tools it allows (a tool not on the list is never offered).
    async fn offer_tools(&mut self) -> Result<(), Stop> {
        let Some(rule) = self.policy.rule_for(&self.task.spec.intent_type).cloned() else {
            return Ok(());
        };
        let mut servers: Vec<&str> = rule.tools.iter().map(|t| t.server.as_str()).collect();
        servers.sort_unstable();
        servers.dedup();
        for name in servers {
            let Some(mut server) = self.policy.mcp_server(name).cloned() else {
                // The gate refuses calls to it; nothing to offer.
                tracing::warn!(task = %self.task.id, server = name, "allow-list names an undeclared MCP server");
                continue;
            };
            // A result is journaled before the model sees it, so one the journal cannot hold is
            // treated as one over the server's own bound: the model is told, nothing is lost.
            if let Some(cap) = self.journal.max_text_bytes() {
                server.max_result_bytes = server.max_result_bytes.min(cap as u64);
            }
            let session = McpSession::connect(&server, self.worker.plans.secrets.as_deref())
                .await
                .map_err(mcp_stop)?;
            let listed = session.list_tools().await.map_err(mcp_stop)?;
            for t in listed {
                let allowed = rule
                    .tools
                    .iter()
                    .any(|r| r.server == server.name && r.name == t.name);
                if !allowed {
                    continue;
                }
                match model_tool_name(&server.name, &t.name) {
                    Some(name) => self.tools.push(ToolSpec {
                        name,
                        description: t.description,
                        input_schema: t.input_schema,
                    }),
                    None => tracing::warn!(server = %server.name, tool = %t.name,
                        "tool name does not fit the model APIs' [A-Za-z0-9_-]{{1,64}}; not offered"),
                }
            }
            self.sessions.insert(server.name.clone(), session);
        }
        Ok(())
    }

    /// One model turn: replayed from the journal when finished, else asked (again) under the step's
    /// idempotency key.
    async fn model_step(&mut self) -> Result<Turn, Stop> {
        let n = self.step;
        if let Some(row) = self.rows.get(&n)
            && row.outcome == StepOutcome::Done
        {
            return turn_from_payload(&row.payload)
                .ok_or_else(|| Stop::Fail(format!("journaled model step {n} is unreadable")));
        }
        let id = self.task.id.clone();
        if !self.rows.contains_key(&n) {
            let entry = JournalEntry::start(&id, n, StepKind::Model, &self.tier.name);
            if let Begun::Existing(row) = self.journal.begin(&entry).await? {
                // Another attempt journaled it meanwhile: its row is the truth.
                self.rows.insert(n, *row);
                return Box::pin(self.model_step()).await;
            }
            self.rows.insert(n, entry);
        }
        let key = idempotency_key(&id, n);
        let span =
            tracing::info_span!("worker.model_call", otel.kind = "client", tier = %self.tier.name);
        let traceparent = self
            .traceparent
            .as_deref()
            .and_then(|trace_id| telemetry::hop_traceparent(&span, trace_id));
        let call = ModelCall {
            tier: &self.tier,
            prompt: &self.prompt.text,
            params: &self.prompt.params,
            idempotency_key: &key,
            traceparent: traceparent.as_deref(),
        };
        let timeout = self.worker.config.call_timeout;
        let asked = tokio::time::timeout(
            timeout,
            self.worker
                .models
                .turn(&call, &self.conversation, &self.tools),
        )
        .instrument(span);
        let started = std::time::Instant::now();
        let reply = tokio::select! {
            r = asked => r,
            _ = self.stop.cancelled() => return Err(Stop::Settle),
        };
        self.worker.metrics.observe(
            "agentplane_model_call_seconds",
            &[("tier", &self.tier.name)],
            started.elapsed().as_secs_f64(),
        );
        let reply = match reply {
            Err(_) => {
                return Err(Stop::Retry(format!(
                    "step {n}: model call timed out after {timeout:?}"
                )));
            }
            Ok(Err(e @ ModelError::Failed(_))) => {
                self.count_model_error("error");
                return Err(Stop::Retry(format!("step {n}: {e}")));
            }
            Ok(Err(e)) => {
                self.count_model_error("rejected");
                return self.fail_step(n, format!("step {n}: {e}")).await;
            }
            Ok(Ok(r)) => r,
        };
        let usage = Usage {
            input_tokens: reply.input_tokens,
            output_tokens: reply.output_tokens,
            cost_micros: self
                .tier
                .cost_micros(reply.input_tokens, reply.output_tokens),
        };
        self.worker.count_model_call(&self.tier, &usage);
        let answer = match &reply.turn {
            Turn::Answer { text } => Some(text.clone()),
            Turn::ToolCalls { .. } => None,
        };
        self.finish(
            n,
            StepOutcome::Done,
            Some(turn_payload(&reply.turn)),
            answer,
            usage,
            None,
        )
        .await?;
        Ok(reply.turn)
    }

    /// One tool call: replayed when finished; otherwise gated, parked for approval, or called
    /// under the step's idempotency key. Returns the result for the model and whether it is an error.
    async fn tool_step(&mut self, call: &ToolCall) -> Result<(String, bool), Stop> {
        let n = self.step;
        if let Some(row) = self.rows.get(&n)
            && row.outcome.is_finished()
        {
            let content = row.result.clone().unwrap_or_default();
            return Ok((content, row.outcome != StepOutcome::Done));
        }
        let id = self.task.id.clone();
        let (server, tool) = split_model_tool_name(&call.name).unwrap_or(("", &call.name));
        let (server, tool) = (server.to_owned(), tool.to_owned());
        let name = if server.is_empty() {
            call.name.clone()
        } else {
            format!("{server}/{tool}")
        };
        // On a resume the journaled arguments are the ones that run (and that an approval covers).
        let arguments = match self.rows.get(&n) {
            Some(row) => row
                .payload
                .get("arguments")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            None => call.arguments.clone(),
        };
        let digest = args_digest(&arguments);
        if !self.rows.contains_key(&n) {
            let mut entry =
                JournalEntry::start(&id, n, StepKind::Tool, &truncate(&name, MAX_STEP_NAME));
            entry.call_id = Some(call.id.clone());
            entry.payload = json!({ "arguments": arguments });
            entry.args_digest = Some(digest.clone());
            if let Begun::Existing(row) = self.journal.begin(&entry).await? {
                self.rows.insert(n, *row);
                return Box::pin(self.tool_step(call)).await;
            }
            self.rows.insert(n, entry);
        }
        let approved = self.approved(n, &digest);
        let decision = {
            let subject = Subject::of_task(&self.task);
            let mut gate = self
                .worker
                .plans
                .gate
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            gate.decide(
                &self.policy,
                &subject,
                &server,
                &tool,
                approved,
                jiff::Timestamp::now(),
            )
        };
        let decision = match decision {
            ToolDecision::Allow => {
                self.rego_gate(n, &server, &tool, &arguments, approved)
                    .await
            }
            other => other,
        };
        match decision {
            ToolDecision::Refuse(why) => {
                self.count_tool(&server, &tool, "refused");
                self.tool_error(n, StepOutcome::Denied, why).await
            }
            ToolDecision::NeedsApproval => {
                self.park(n, &server, &tool, arguments, digest).await?;
                Err(Stop::Parked)
            }
            ToolDecision::Allow => {
                let Some(session) = self.sessions.get(&server) else {
                    return Err(Stop::Retry(format!(
                        "step {n}: MCP server {server} is not connected"
                    )));
                };
                let key = tool_idempotency_key(&id, n);
                // The call's own span is `mcp.tool_call`, a child of this step's.
                let called = session.call(&tool, arguments, &key);
                let out = tokio::select! {
                    r = called => r,
                    _ = self.stop.cancelled() => return Err(Stop::Settle),
                };
                match out {
                    Ok(out) => {
                        let outcome = if out.is_error {
                            StepOutcome::Failed
                        } else {
                            StepOutcome::Done
                        };
                        self.count_tool(&server, &tool, if out.is_error { "error" } else { "ok" });
                        let error = out
                            .is_error
                            .then(|| "the tool returned an error result".to_owned());
                        self.finish(
                            n,
                            outcome,
                            None,
                            Some(out.text.clone()),
                            Usage::default(),
                            error.as_deref(),
                        )
                        .await?;
                        Ok((out.text, out.is_error))
                    }
                    // The call ran but its result is unusable (running it again would repeat the
                    // effect and get the same), or the server refused the request (unknown tool,
                    // bad arguments: the session is fine): the model is told instead.
                    Err(e @ (McpError::ResultTooLarge { .. } | McpError::Refused { .. })) => {
                        self.count_tool(&server, &tool, "error");
                        self.tool_error(n, StepOutcome::Failed, e.to_string()).await
                    }
                    // Transport failures (crash, timeout, connect): the step stays begun and the
                    // next attempt re-issues it under the same key.
                    Err(e) if e.is_transient() => {
                        self.count_tool(&server, &tool, "failed");
                        Err(Stop::Retry(format!("step {n} ({name}): {e}")))
                    }
                    // What fails the same way every time (a protocol violation, an answer over the
                    // message bound): retrying would only burn deliveries, so the task fails now.
                    Err(e) => {
                        self.count_tool(&server, &tool, "failed");
                        self.fail_step(n, format!("step {n} ({name}): {e}")).await
                    }
                }
            }
        }
    }

    /// The policy's Rego modules on a call the built-in gate let through: a denial (or a policy that
    /// cannot decide: fail closed) refuses it with the reasons, `require_approval` parks it unless an
    /// approval covers this exact call. No Rego modules: the gate's `Allow` stands.
    async fn rego_gate(
        &self,
        n: u32,
        server: &str,
        tool: &str,
        arguments: &Map<String, Value>,
        approved: bool,
    ) -> ToolDecision {
        let call = rego::ToolCall {
            namespace: self.worker.store.namespace(),
            intent_type: &self.task.spec.intent_type,
            server,
            tool,
            arguments,
            task_id: &self.task.id,
            step: n,
        };
        let verdict = self
            .worker
            .plans
            .rego
            .decide_tool_call(Some(&self.policy), &call)
            .await;
        match verdict {
            Ok(None) => ToolDecision::Allow,
            Ok(Some(v)) => {
                tracing::info!(task = %self.task.id, step = n, server, tool, decision = v.decision.as_str(), digest = %v.digest, "rego decided a tool call");
                match v.decision {
                    RegoDecisionKind::Allow => ToolDecision::Allow,
                    RegoDecisionKind::RequireApproval if approved => ToolDecision::Allow,
                    RegoDecisionKind::RequireApproval => ToolDecision::NeedsApproval,
                    RegoDecisionKind::Deny => ToolDecision::Refuse(rego::denial_message(&v)),
                }
            }
            Err(e) => ToolDecision::Refuse(format!("Rego policy could not decide: {e}")),
        }
    }

    /// Ends step `n` as failed for good: journaled with `why`, and the task fails with it.
    async fn fail_step<T>(&mut self, n: u32, why: String) -> Result<T, Stop> {
        self.finish(
            n,
            StepOutcome::Failed,
            None,
            None,
            Usage::default(),
            Some(&why),
        )
        .await?;
        Err(Stop::Fail(why))
    }

    /// Ends tool step `n` without a usable result: `why` is journaled and goes back to the model
    /// as an error result.
    async fn tool_error(
        &mut self,
        n: u32,
        outcome: StepOutcome,
        why: String,
    ) -> Result<(String, bool), Stop> {
        self.finish(
            n,
            outcome,
            None,
            Some(why.clone()),
            Usage::default(),
            Some(&why),
        )
        .await?;
        Ok((why, true))
    }

    /// Whether the task carries an accepted approval of exactly step `n` with these arguments.
    fn approved(&self, n: u32, digest: &str) -> bool {
        let Some(pending) = &self.task.status.pending_approval else {
            return false;
        };
        let Some(approval) = &self.task.status.approval else {
            return false;
        };
        pending.step == n
            && pending.args_digest == digest
            && approval.decision == ApprovalDecision::Approved
            && approval.covers(pending)
    }

    /// Parks the task at step `n` for an approver.
    async fn park(
        &mut self,
        n: u32,
        server: &str,
        tool: &str,
        arguments: Map<String, Value>,
        digest: String,
    ) -> Result<(), Stop> {
        self.journal.await_approval(&self.task.id, n).await?;
        if let Some(row) = self.rows.get_mut(&n) {
            row.outcome = StepOutcome::AwaitingApproval;
        }
        let task = self.with_progress();
        let status = AgentTaskStatus {
            phase: Some(TaskPhase::AwaitingApproval),
            pending_approval: Some(PendingApproval {
                step: n,
                server: server.to_owned(),
                tool: tool.to_owned(),
                arguments,
                args_digest: digest,
                requested_at: Some(Time(jiff::Timestamp::now())),
            }),
            // `status.approval` is the operator's record (the cluster's admission policy refuses
            // anyone else changing it): an earlier step's decision stays, and covers nothing here
            // (`Approval::covers` needs this step and digest).
            reason: Some(format!("step {n} ({server}/{tool}) waits for an approver")),
            ..task.status.clone()
        };
        self.task = write_status(&*self.worker.store, &task, status).await?;
        self.worker.metrics.inc(
            "agentplane_task_transitions_total",
            &[("phase", "AwaitingApproval")],
        );
        tracing::info!(task = %self.task.id, step = n, server, tool, "plan waits for approval");
        Ok(())
    }

    /// Finishes step `n` in the journal and shows it in the task's status.
    async fn finish(
        &mut self,
        n: u32,
        outcome: StepOutcome,
        payload: Option<Value>,
        result: Option<String>,
        usage: Usage,
        error: Option<&str>,
    ) -> Result<(), Stop> {
        let error = error.map(|e| truncate(e, MAX_STEP_ERROR));
        let end = StepEnd {
            outcome,
            payload: payload.clone(),
            result: result.clone(),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cost_micros: usage.cost_micros,
            error: error.clone(),
        };
        self.journal.finish(&self.task.id, n, end).await?;
        if let Some(row) = self.rows.get_mut(&n) {
            row.outcome = outcome;
            if let Some(p) = payload {
                row.payload = p;
            }
            row.result = result;
            row.input_tokens = usage.input_tokens;
            row.output_tokens = usage.output_tokens;
            row.cost_micros = usage.cost_micros;
            row.finished_at = Some(jiff::Timestamp::now());
            row.error = error;
        }
        self.publish().await
    }

    /// Writes the steps and the usage so far to the task's status (conditional on the version
    /// this attempt holds: a write by anyone else stops the plan).
    async fn publish(&mut self) -> Result<(), Stop> {
        let task = self.with_progress();
        let mut status = task.status.clone();
        // Once the approved call has run, nothing waits any more; the decision stays as the record.
        if status.pending_approval.as_ref().is_some_and(|p| {
            self.rows
                .get(&p.step)
                .is_some_and(|r| r.outcome.is_finished())
        }) {
            status.pending_approval = None;
        }
        // A step finished, so the plan runs: a reason left from before (suspended before step N,
        // a step approved, an attempt that failed) no longer describes the task.
        status.reason = None;
        self.task = write_status(&*self.worker.store, &self.task, status).await?;
        Ok(())
    }

    /// The task with this attempt's steps and usage in its status.
    fn with_progress(&self) -> TaskRecord {
        let mut task = self.task.clone();
        task.status.steps = self.summaries();
        task.status.usage = Some(self.usage());
        task
    }

    fn summaries(&self) -> Vec<PlanStep> {
        self.rows.values().map(JournalEntry::summary).collect()
    }

    /// Every model turn's tokens and cost, so budgets count the whole plan.
    fn usage(&self) -> Usage {
        self.rows.values().fold(Usage::default(), |u, r| Usage {
            input_tokens: u.input_tokens + r.input_tokens,
            output_tokens: u.output_tokens + r.output_tokens,
            cost_micros: u.cost_micros + r.cost_micros,
        })
    }

    fn count_model_error(&self, outcome: &str) {
        self.worker.metrics.inc(
            "agentplane_model_calls_total",
            &[("tier", &self.tier.name), ("outcome", outcome)],
        );
    }

    fn count_tool(&self, server: &str, tool: &str, outcome: &str) {
        self.worker.metrics.inc(
            "agentplane_tool_calls_total",
            &[("server", server), ("tool", tool), ("outcome", outcome)],
        );
    }
}

/// How a finished model step is journaled: `{"answer": text}` or `{"text", "calls": [...]}`.
fn turn_payload(turn: &Turn) -> Value {
    match turn {
        Turn::Answer { text } => json!({ "answer": text }),
        Turn::ToolCalls { text, calls } => json!({
            "text": text,
            "calls": calls.iter().map(|c| json!({
                "id": c.id, "name": c.name, "arguments": c.arguments,
            })).collect::<Vec<_>>(),
        }),
    }
}

fn turn_from_payload(payload: &Value) -> Option<Turn> {
    if let Some(text) = payload.get("answer").and_then(Value::as_str) {
        return Some(Turn::Answer {
            text: text.to_owned(),
        });
    }
    let calls = payload.get("calls")?.as_array()?;
    let calls = calls
        .iter()
        .map(|c| {
            Some(ToolCall {
                id: c.get("id")?.as_str()?.to_owned(),
                name: c.get("name")?.as_str()?.to_owned(),
                arguments: c.get("arguments")?.as_object()?.clone(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Turn::ToolCalls {
        text: payload
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned),
        calls,
    })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journaled_turns_read_back_as_they_were() {
        let turns = [
            Turn::Answer {
                text: "done".into(),
            },
            Turn::ToolCalls {
                text: Some("looking".into()),
                calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "rec__write_record".into(),
                    arguments: json!({"key": "a"}).as_object().unwrap().clone(),
                }],
            },
            Turn::ToolCalls {
                text: None,
                calls: vec![],
            },
        ];
        for t in turns {
            assert_eq!(turn_from_payload(&turn_payload(&t)), Some(t));
        }
        assert_eq!(turn_from_payload(&json!({"calls": "x"})), None);
        assert_eq!(truncate("héllo", 2), "h");
    }
}
