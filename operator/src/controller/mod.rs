//! The controller: admits Pending tasks and routes decided approvals, generic over the store and queue.
//!
//! `reconcile` is one level-triggered step for one task (read state, decide, write at most one phase
//! change); `run` drives it from the store's change feed, a periodic resync and a timer queue for
//! tasks that asked to be looked at again later ([`Outcome::RequeueAfter`]), the same shape as a
//! kube-rs `Controller` (watch + requeue), so the distributed operator can reuse `reconcile` as is.
//!
//! Governance: rate limits and budgets are decided at admission against a [`Ledger`]. `run` owns one:
//! rebuilt from `TaskStore::list_tasks` before the first reconcile (so a restart keeps every window
//! and every period's spend), updated right after each admission it writes, and fed every change
//! event so an estimate becomes the real cost when the task succeeds. Each admission is recorded in
//! the task's status as an `Admitted=True` condition stamped with the admission time (reason
//! `WithinPolicy`, or `ModelDowngraded` with the budget that moved it down the ladder); that is what
//! the rebuild reads. A task held by a rate limit gets `Admitted=False` (`RateLimited`) once and is
//! reconciled again when the window has room.

pub mod breaker;
pub mod gpu_job;
pub mod operator;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use agentplane_api::TaskPhase;
use agentplane_api::policy::AgentPolicySpec;
use agentplane_api::task::{AgentTaskStatus, ApprovalDecision, QueueStatus};
use jiff::Timestamp;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::policy::ledger::{admission_condition, set_condition};
use crate::policy::rego::{self, RegoPolicies};
use crate::policy::{self, Decision, Ledger, Subject, TierChoice};
use crate::queue::{
    ATTR_TASK_ID, ATTR_TRACEPARENT, DynQueue, Outgoing, QueueError, QueueMessage, TaskQueue,
    TaskRef,
};
use crate::store::{DynStore, StoreError, TaskRecord, TaskStore, write_status};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What one reconcile did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Nothing to do now (terminal, waiting for a worker or an approver, or the policy is suspended).
    Unchanged,
    /// The task moved to a new phase.
    Moved(TaskPhase),
    /// Still Pending (held by a rate limit); reconcile it again after this long.
    RequeueAfter(Duration),
}

/// An admission decision, for `agentplane_admission_decisions_total{decision,reason}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionDecision {
    /// `admitted`, `awaiting_approval`, `denied` or `held`.
    pub decision: &'static str,
    /// `within_policy`, `downgraded`, or the denial/hold code (`rate_limited`, `budget_exhausted`, ...).
    pub reason: String,
}

impl AdmissionDecision {
    fn new(decision: &'static str, reason: impl Into<String>) -> Self {
        AdmissionDecision {
            decision,
            reason: reason.into(),
        }
    }
}

/// What one step did, and the admission decision it took, if it took one.
struct Step {
    outcome: Outcome,
    decision: Option<AdmissionDecision>,
}

impl From<Outcome> for Step {
    fn from(outcome: Outcome) -> Self {
        Step {
            outcome,
            decision: None,
        }
    }
}

/// One reconcile step for one task, without a long-lived ledger: when the policy has rate limits or
/// budgets, one is rebuilt from the store for this step (every task is listed). [`Controller::run`]
/// keeps its ledger instead; this form is for tools and tests that drive single steps.
///
/// The policy's Rego modules, if it has any, are compiled for this call; long-running callers keep
/// a [`RegoPolicies`] and use [`reconcile_with`].
pub async fn reconcile(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
) -> Result<Outcome, ControllerError> {
    Ok(step(store, queue, task, None, &RegoPolicies::default())
        .await?
        .outcome)
}

/// One reconcile step deciding with `rego`'s compiled modules (compiled once per version, the
/// previous version kept in force when a new one does not compile) and, when given, `ledger`.
pub async fn reconcile_with(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    ledger: Option<&mut Ledger>,
    rego: &RegoPolicies,
) -> Result<(Outcome, Option<AdmissionDecision>), ControllerError> {
    let s = step(store, queue, task, ledger, rego).await?;
    Ok((s.outcome, s.decision))
}

/// One reconcile step for one task, deciding rate limits and budgets against `ledger` and recording
/// an admission in it.
pub async fn reconcile_with_ledger(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    ledger: &mut Ledger,
) -> Result<(Outcome, Option<AdmissionDecision>), ControllerError> {
    reconcile_with(store, queue, task, Some(ledger), &RegoPolicies::default()).await
}

async fn step(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    ledger: Option<&mut Ledger>,
    rego: &RegoPolicies,
) -> Result<Step, ControllerError> {
    let phase = task.phase();
    if phase.is_terminal() {
        return Ok(Outcome::Unchanged.into());
    }
    if task.spec.cancel_requested() {
        // A Running task's worker sees the new phase when it re-reads, stops, and deletes its message.
        return Ok(finish(
            store,
            task,
            TaskPhase::Cancelled,
            "cancelled at the device's request",
        )
        .await?
        .into());
    }
    match phase {
        TaskPhase::Pending => admit(store, queue, task, ledger, rego).await,
        TaskPhase::AwaitingApproval => decide(store, queue, task).await.map(Step::from),
        // Queued and Running belong to the workers.
        _ => Ok(Outcome::Unchanged.into()),
    }
}

/// AwaitingApproval: looks for an approver's decision about what waits (the task, or the plan's
/// pending call) among the task's recorded decisions, and acts on the first that counts, copying it
/// into `status.approval` in the same write that moves the task. The controller is the only writer
/// of `status.approval`; whoever recorded a decision, it counts only if its approver is one of the
/// policy's approvers now, at decision time (the list may have changed since the gateway checked),
/// and, for a plan, only if it covers the pending call (same step, same arguments).
async fn decide(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
) -> Result<Outcome, ControllerError> {
    let pending = task.status.pending_approval.as_ref();
    let decisions = store.decisions(&task.id).await?;
    // Decisions about other steps of the plan (or the task-level one) are not about this wait.
    let about_this_wait: Vec<_> = decisions
        .iter()
        .map(|d| &d.approval)
        .filter(|a| a.step == pending.map(|p| p.step))
        .collect();
    if about_this_wait.is_empty() {
        return Ok(Outcome::Unchanged);
    }
    let policy = store.get_policy().await?.unwrap_or_default();
    let mut refusal = None;
    let mut accepted = None;
    for approval in about_this_wait {
        if !policy::is_approver(&policy, &approval.approver) {
            let why = format!(
                "decision by {:?} refused: not an approver in the AgentPolicy",
                approval.approver
            );
            refusal = Some(("NotAnApprover", why));
            continue;
        }
        // A plan waits at one tool call: the decision must name that step and those exact
        // arguments (a decision about other arguments is not about it).
        if let Some(pending) = pending
            && !approval.covers(pending)
        {
            let why = format!(
                "decision by {:?} refused: it is about step {:?} with arguments {:?}, but step {} ({}/{}) waits with arguments {}",
                approval.approver,
                approval.step,
                approval.args_digest,
                pending.step,
                pending.server,
                pending.tool,
                pending.args_digest
            );
            refusal = Some(("DecisionMismatch", why));
            continue;
        }
        accepted = Some(approval);
        break;
    }
    let Some(approval) = accepted else {
        return match refusal {
            Some((reason, why)) => refuse_decision(store, task, reason, &why).await,
            None => Ok(Outcome::Unchanged),
        };
    };
    let mut status = task.status.clone();
    status.approval = Some(approval.clone());
    match approval.decision {
        ApprovalDecision::Denied => {
            let reason = match pending {
                Some(p) => format!(
                    "denied by approver {} at step {} ({}/{})",
                    approval.approver, p.step, p.server, p.tool
                ),
                None => format!("denied by approver {}", approval.approver),
            };
            finish_from(store, task, status, TaskPhase::Denied, &reason).await
        }
        ApprovalDecision::Approved => {
            // The reason said what the task waited for; that wait is over.
            status.reason = Some(match pending {
                Some(p) => format!(
                    "step {} ({}/{}) approved by {}",
                    p.step, p.server, p.tool, approval.approver
                ),
                None => format!("approved by {}", approval.approver),
            });
            // Rate limits and budgets were applied when the task was parked; the tier (and its
            // reservation in the ledger) chosen then is the one that runs.
            match recorded_tier(task) {
                Some(tier) => enqueue(store, queue, task, &tier, status).await,
                None => {
                    finish_from(
                        store,
                        task,
                        status,
                        TaskPhase::Failed,
                        "approved task has no model tier recorded",
                    )
                    .await
                }
            }
        }
    }
}

/// Drops a decision that does not count (an approver not in the policy's `approvers`, or a decision
/// about another call than the pending one): the task keeps waiting, and `Approved=False` with
/// `reason` says whose decision was refused and why.
async fn refuse_decision(
    store: &dyn TaskStore,
    task: &TaskRecord,
    reason: &str,
    message: &str,
) -> Result<Outcome, ControllerError> {
    // The refused decision stays recorded and is judged again on every reconcile: say so once.
    let said = task.status.conditions.iter().any(|c| {
        c.type_ == crate::store::CONDITION_APPROVED
            && c.status == "False"
            && c.reason == reason
            && c.message == message
    });
    if said {
        return Ok(Outcome::Unchanged);
    }
    let mut status = task.status.clone();
    set_condition(
        &mut status.conditions,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: crate::store::CONDITION_APPROVED.to_owned(),
            status: "False".to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            ),
            observed_generation: None,
        },
    );
    write_status(store, task, status).await?;
    tracing::warn!(task = %task.id, reason, message, "approval refused");
    Ok(Outcome::Unchanged)
}

/// Whether the policy has anything a ledger counts for (rate limits or budgets).
pub fn governs(policy: Option<&AgentPolicySpec>) -> bool {
    policy.is_some_and(|p| {
        !p.budgets.is_empty() || p.intents.iter().any(|r| !r.rate_limits.is_empty())
    })
}

/// Pending: re-verify everything the gateway checked (a task may have been created around it), then
/// apply the policy.
async fn admit(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    ledger: Option<&mut Ledger>,
    rego: &RegoPolicies,
) -> Result<Step, ControllerError> {
    let device_name = &task.spec.device_ref.name;
    let Some(device) = store.get_device(device_name).await? else {
        return deny(
            store,
            task,
            "unknown_device",
            &format!("device {device_name:?} is not registered"),
        )
        .await;
    };
    if device.spec.revoked {
        return deny(
            store,
            task,
            "device_revoked",
            &format!("device {device_name:?} is revoked"),
        )
        .await;
    }
    let verified = device.spec.device_keys().and_then(|keys| {
        task.spec
            .envelope
            .verify(device_name, &keys, task.created_at)
    });
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            return deny(
                store,
                task,
                e.code(),
                &format!("envelope does not verify: {e}"),
            )
            .await;
        }
    };
    if verified.payload.task_id != task.id {
        let e = format!(
            "signed taskId {:?} is not the task's name",
            verified.payload.task_id
        );
        return deny(store, task, "task_id_mismatch", &e).await;
    }
    if let Err(e) = task.spec.check_against(&verified.payload) {
        return deny(store, task, "display_mismatch", &e.to_string()).await;
    }
    let policy = store.get_policy().await?;
    let now = Timestamp::now();
    let mut scratch = None;
    let ledger: &mut Ledger = match ledger {
        Some(l) => l,
        None if governs(policy.as_ref()) => {
            let tasks = store.list_tasks().await?;
            scratch.insert(Ledger::rebuild(&tasks, policy.as_ref(), now))
        }
        None => scratch.insert(Ledger::default()),
    };
    let payload = &verified.payload;
    let decision = policy::evaluate(policy.as_ref(), &device.spec, payload, ledger, now);
    let (decision, verdict) =
        rego::apply_to_admission(rego, policy.as_ref(), store.namespace(), payload, decision).await;
    // Every write below starts from the task's status, so the verdict rides along into it (and
    // from there into the decision's audit leaf).
    let with_verdict;
    let task = match verdict {
        Some(v) => {
            let mut t = task.clone();
            t.status.rego = Some(v);
            with_verdict = t;
            &with_verdict
        }
        None => task,
    };
    match decision {
        Decision::Hold {
            code,
            reason,
            retry_after,
        } => {
            let decision = Some(AdmissionDecision::new("held", code));
            let Some(after) = retry_after else {
                // The kill switch: nothing to write; the resync looks again.
                return Ok(Step {
                    outcome: Outcome::Unchanged,
                    decision,
                });
            };
            hold(store, task, &reason, now).await?;
            Ok(Step {
                outcome: Outcome::RequeueAfter(after),
                decision,
            })
        }
        Decision::Deny { code, reason } => deny(store, task, code, &reason).await,
        Decision::AwaitApproval(tier) => {
            let status = AgentTaskStatus {
                phase: Some(TaskPhase::AwaitingApproval),
                model: Some(tier.selection()),
                ..admitted_status(task, &tier, now)
            };
            write_status(store, task, status).await?;
            ledger.record_admission(&task.id, &Subject::of(payload), now, tier.estimate_micros);
            Ok(Step {
                outcome: Outcome::Moved(TaskPhase::AwaitingApproval),
                decision: Some(AdmissionDecision::new(
                    "awaiting_approval",
                    admitted_reason(&tier),
                )),
            })
        }
        Decision::Admit(tier) => {
            let outcome =
                enqueue(store, queue, task, &tier, admitted_status(task, &tier, now)).await?;
            ledger.record_admission(&task.id, &Subject::of(payload), now, tier.estimate_micros);
            Ok(Step {
                outcome,
                decision: Some(AdmissionDecision::new("admitted", admitted_reason(&tier))),
            })
        }
    }
}

fn admitted_reason(tier: &TierChoice) -> &'static str {
    if tier.downgrade.is_some() {
        "downgraded"
    } else {
        "within_policy"
    }
}

/// The task's status with the `Admitted=True` condition that records this admission (and its time,
/// which the ledger is rebuilt from).
fn admitted_status(task: &TaskRecord, tier: &TierChoice, now: Timestamp) -> AgentTaskStatus {
    let mut status = task.status.clone();
    let condition = match &tier.downgrade {
        Some(why) => admission_condition(true, "ModelDowngraded", why, now),
        None => admission_condition(
            true,
            "WithinPolicy",
            &format!("admitted on model tier {:?}", tier.name),
            now,
        ),
    };
    set_condition(&mut status.conditions, condition);
    status
}

/// Marks a task held by a rate limit with `Admitted=False` once, so its status says why it waits. The
/// message leaves out the changing retry-after, so looking again does not write (and wake) again.
async fn hold(
    store: &dyn TaskStore,
    task: &TaskRecord,
    reason: &str,
    now: Timestamp,
) -> Result<(), ControllerError> {
    let message = match reason.rsplit_once("; retry after") {
        Some((why, _)) => format!("held until the rate limit has room: {why}"),
        None => format!("held until the rate limit has room: {reason}"),
    };
    let already = task.status.conditions.iter().any(|c| {
        c.type_ == policy::ledger::ADMITTED_CONDITION && c.status == "False" && c.message == message
    });
    if already {
        return Ok(());
    }
    let mut status = task.status.clone();
    set_condition(
        &mut status.conditions,
        admission_condition(false, "RateLimited", &message, now),
    );
    match write_status(store, task, status).await {
        // Someone else wrote first (a cancel): their change event brings the task back.
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The tier the task was admitted on (recorded in `status.model`), for sending it again.
fn recorded_tier(task: &TaskRecord) -> Option<TierChoice> {
    task.status.model.as_ref().and_then(|m| {
        Some(TierChoice {
            index: m.tier? as usize,
            name: m.selected.clone()?,
            requested: m.requested.clone(),
            estimate_micros: 0,
            downgrade: None,
        })
    })
}

/// Sends a Queued task's work item again under `dedup_id` (a GPU task whose Job ended without
/// finishing it, e.g. handed back while the namespace was suspended) and records the new dispatch.
pub(crate) async fn redispatch(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    dedup_id: String,
) -> Result<Outcome, ControllerError> {
    match recorded_tier(task) {
        Some(tier) => enqueue_as(store, queue, task, &tier, task.status.clone(), dedup_id).await,
        None => {
            finish(
                store,
                task,
                TaskPhase::Failed,
                "queued task has no model tier recorded",
            )
            .await
        }
    }
}

/// Sends the work item, then records Queued. In that order: a crash in between leaves a Pending task
/// whose next reconcile sends again, and the task-id deduplication id makes that second send a no-op.
async fn enqueue(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    tier: &TierChoice,
    base: AgentTaskStatus,
) -> Result<Outcome, ControllerError> {
    // A plan approved at a step is sent again while its first message may still be in the queue
    // (the parking worker deletes it after writing AwaitingApproval) or inside SQS FIFO's
    // 5-minute window: a per-step id keeps the second send from being deduplicated.
    let dedup_id = match &task.status.pending_approval {
        Some(p) => format!("{}/step/{}", task.id, p.step),
        None => task.id.clone(),
    };
    enqueue_as(store, queue, task, tier, base, dedup_id).await
}

/// [`enqueue`] under an explicit deduplication id (which also names a GPU task's Job).
async fn enqueue_as(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    tier: &TierChoice,
    base: AgentTaskStatus,
    dedup_id: String,
) -> Result<Outcome, ControllerError> {
    let body = QueueMessage {
        task: TaskRef {
            namespace: store.namespace().to_owned(),
            name: task.id.clone(),
            uid: task.id.clone(),
        },
        tier: tier.name.clone(),
        attempt: 0,
    };
    // The controller's hop of the task's trace: the message carries this span's context, so the
    // worker's handling is its child.
    let span = tracing::info_span!("controller.enqueue", otel.kind = "producer", task = %task.id);
    let mut attributes = BTreeMap::from([(ATTR_TASK_ID.to_owned(), task.id.clone())]);
    // The display copy was checked against the signed payload at admission. A queue that can place
    // work on a GPU pool (the operator's Job dispatch) reads this; a plain queue just carries it.
    let gpus = task.spec.required_resources.gpu;
    if gpus > 0 {
        attributes.insert(gpu_job::ATTR_GPUS.to_owned(), gpus.to_string());
    }
    if let Some(trace_id) = &task.status.trace_id {
        telemetry::join_trace(&span, trace_id, None);
        if let Some(tp) = telemetry::hop_traceparent(&span, trace_id) {
            attributes.insert(ATTR_TRACEPARENT.to_owned(), tp);
        }
    }
    let message_id = queue
        .send(Outgoing {
            body: serde_json::to_string(&body).map_err(QueueError::backend)?,
            attributes,
            group_id: Some(task.spec.device_ref.name.clone()),
            dedup_id: Some(dedup_id),
        })
        .instrument(span)
        .await?;
    let status = AgentTaskStatus {
        phase: Some(TaskPhase::Queued),
        model: Some(tier.selection()),
        queue: Some(QueueStatus {
            message_id: Some(message_id),
            receive_count: 0,
        }),
        ..base
    };
    write_status(store, task, status).await?;
    Ok(Outcome::Moved(TaskPhase::Queued))
}

async fn deny(
    store: &dyn TaskStore,
    task: &TaskRecord,
    code: &str,
    reason: &str,
) -> Result<Step, ControllerError> {
    let outcome = finish(store, task, TaskPhase::Denied, &format!("{code}: {reason}")).await?;
    Ok(Step {
        outcome,
        decision: Some(AdmissionDecision::new("denied", code)),
    })
}

pub(crate) async fn finish(
    store: &dyn TaskStore,
    task: &TaskRecord,
    phase: TaskPhase,
    reason: &str,
) -> Result<Outcome, ControllerError> {
    finish_from(store, task, task.status.clone(), phase, reason).await
}

/// [`finish`] from `base` (the task's status with this reconcile's other changes in it).
async fn finish_from(
    store: &dyn TaskStore,
    task: &TaskRecord,
    base: AgentTaskStatus,
    phase: TaskPhase,
    reason: &str,
) -> Result<Outcome, ControllerError> {
    let status = AgentTaskStatus {
        phase: Some(phase),
        reason: Some(reason.to_owned()),
        ..base
    };
    write_status(store, task, status).await?;
    tracing::info!(task = %task.id, %phase, reason, "task finished by the controller");
    Ok(Outcome::Moved(phase))
}

/// Whether a change event can need the controller.
fn interesting(phase: TaskPhase, cancel_requested: bool) -> bool {
    !phase.is_terminal()
        && (cancel_requested || matches!(phase, TaskPhase::Pending | TaskPhase::AwaitingApproval))
}

pub struct Controller {
    pub store: DynStore,
    pub queue: DynQueue,
    pub metrics: Arc<Metrics>,
    /// Full re-list period: catches anything a missed change event left behind.
    pub resync: Duration,
}

/// Longest wait between attempts to load the ledger at start-up.
const MAX_LOAD_BACKOFF: Duration = Duration::from_secs(5);

/// Shortest requeue: a timer that fires a hair early just asks again, never in a tight loop.
const MIN_REQUEUE: Duration = Duration::from_millis(10);

/// Tasks to reconcile again at a given instant (rate-limit holds). One entry per task: scheduling a
/// task again replaces its earlier deadline, so the map is bounded by the number of held tasks.
#[derive(Default)]
struct Requeue {
    due: BTreeSet<(Instant, String)>,
    by_task: HashMap<String, Instant>,
}

impl Requeue {
    fn schedule(&mut self, id: &str, at: Instant) {
        if let Some(old) = self.by_task.insert(id.to_owned(), at) {
            self.due.remove(&(old, id.to_owned()));
        }
        self.due.insert((at, id.to_owned()));
    }

    fn cancel(&mut self, id: &str) {
        if let Some(old) = self.by_task.remove(id) {
            self.due.remove(&(old, id.to_owned()));
        }
    }

    fn next(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some((at, _)) = self.due.first()
            && *at <= now
        {
            if let Some((_, id)) = self.due.pop_first() {
                self.by_task.remove(&id);
                ids.push(id);
            }
        }
        ids
    }

    fn len(&self) -> usize {
        self.by_task.len()
    }
}

/// What `run` keeps between steps.
struct State {
    ledger: Ledger,
    requeue: Requeue,
    /// The policy as last read: prices the in-flight tasks the ledger learns of from events.
    policy: Option<AgentPolicySpec>,
    /// The policy's Rego modules, compiled once per version.
    rego: RegoPolicies,
}

impl Controller {
    /// Runs until `shutdown`. Reconciles one task at a time: the work per task is a few store calls,
    /// one writer keeps the controller's own writes from conflicting with each other, and the ledger
    /// sees admissions in the order they were decided (which is what makes a rate limit exact).
    pub async fn run(self, shutdown: CancellationToken) {
        // Subscribe before listing: whatever commits after the list arrives as an event.
        let mut changes = self.store.changes();
        let Some(mut state) = self.load(&shutdown).await else {
            tracing::info!("controller stopped before its ledger was loaded");
            return;
        };
        // A zero period would make `interval` panic.
        let mut resync = tokio::time::interval(self.resync.max(Duration::from_millis(10)));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = state.requeue.next();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = resync.tick() => {
                    state.ledger.prune(Timestamp::now());
                    self.refresh_policy(&mut state).await;
                    self.resync_all(&mut state).await;
                }
                _ = sleep_until(wake), if wake.is_some() => self.fire_due(&mut state).await,
                ev = changes.recv() => match ev {
                    Ok(ev) => {
                        self.metrics.observe_task_phase(&ev.id, ev.phase);
                        state.ledger.observe(&ev.task, state.policy.as_ref(), Timestamp::now());
                        if interesting(ev.phase, ev.cancel_requested) {
                            self.reconcile_one(&mut state, &ev.task).await;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        // Missed events may have carried costs: rebuild the ledger, then resync.
                        tracing::warn!(missed = n, "controller fell behind the change feed; resyncing");
                        if let Err(e) = self.rebuild(&mut state).await {
                            tracing::error!(error = %e, "ledger rebuild failed; keeping the current one");
                        }
                        self.resync_all(&mut state).await;
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
        tracing::info!("controller stopped");
    }

    /// Builds the ledger from the store, retrying with backoff: admitting with an empty ledger would
    /// reset every rate limit and budget, so nothing is reconciled until it has loaded.
    async fn load(&self, shutdown: &CancellationToken) -> Option<State> {
        let mut state = State {
            ledger: Ledger::default(),
            requeue: Requeue::default(),
            policy: None,
            rego: RegoPolicies::default(),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.rebuild(&mut state).await {
                Ok(()) => return Some(state),
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "could not load the governance ledger");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_LOAD_BACKOFF);
        }
    }

    async fn rebuild(&self, state: &mut State) -> Result<(), StoreError> {
        let policy = self.store.get_policy().await?;
        let tasks = self.store.list_tasks().await?;
        for t in &tasks {
            self.metrics.observe_task_phase(&t.id, t.phase());
        }
        state.ledger = Ledger::rebuild(&tasks, policy.as_ref(), Timestamp::now());
        state.policy = policy;
        tracing::debug!(
            tasks = tasks.len(),
            admitted = state.ledger.admitted_tasks(),
            "governance ledger loaded"
        );
        Ok(())
    }

    async fn refresh_policy(&self, state: &mut State) {
        match self.store.get_policy().await {
            Ok(p) => state.policy = p,
            Err(e) => tracing::warn!(error = %e, "could not re-read the policy"),
        }
    }

    async fn resync_all(&self, state: &mut State) {
        match self.store.list_unfinished().await {
            Ok(tasks) => {
                for t in tasks
                    .iter()
                    .filter(|t| interesting(t.phase(), t.spec.cancel_requested()))
                {
                    self.reconcile_one(state, t).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "controller resync failed"),
        }
    }

    /// Reconciles the tasks whose requeue time has come, oldest first (held tasks are admitted
    /// roughly in the order they arrived), from a fresh read.
    async fn fire_due(&self, state: &mut State) {
        let mut tasks = Vec::new();
        for id in state.requeue.pop_due(Instant::now()) {
            match self.store.get_task(&id).await {
                Ok(Some(t)) => tasks.push(t),
                Ok(None) => {}
                Err(e) => {
                    // Try again shortly rather than losing the task until the next resync.
                    tracing::warn!(task = %id, error = %e, "requeued task not read");
                    state
                        .requeue
                        .schedule(&id, Instant::now() + self.resync.min(MAX_LOAD_BACKOFF));
                }
            }
        }
        tasks.sort_by_key(|t| t.created_at);
        for t in tasks
            .iter()
            .filter(|t| interesting(t.phase(), t.spec.cancel_requested()))
        {
            self.reconcile_one(state, t).await;
        }
    }

    async fn reconcile_one(&self, state: &mut State, task: &TaskRecord) {
        let started = std::time::Instant::now();
        let span = tracing::info_span!("controller.reconcile", task = %task.id);
        if let Some(trace_id) = &task.status.trace_id {
            telemetry::join_trace(&span, trace_id, None);
        }
        let State { ledger, rego, .. } = state;
        let result = reconcile_with(&*self.store, &*self.queue, task, Some(ledger), rego)
            .instrument(span)
            .await;
        self.metrics.observe(
            "agentplane_reconcile_seconds",
            &[],
            started.elapsed().as_secs_f64(),
        );
        if let Ok((_, Some(d))) = &result {
            self.metrics.inc(
                "agentplane_admission_decisions_total",
                &[("decision", d.decision), ("reason", &d.reason)],
            );
        }
        match result {
            Ok((Outcome::Moved(phase), _)) => {
                state.requeue.cancel(&task.id);
                self.metrics.inc(
                    "agentplane_task_transitions_total",
                    &[("phase", phase.as_str())],
                );
            }
            Ok((Outcome::RequeueAfter(after), _)) => {
                state
                    .requeue
                    .schedule(&task.id, Instant::now() + after.max(MIN_REQUEUE));
                tracing::debug!(task = %task.id, ?after, held = state.requeue.len(), "held; requeued");
            }
            Ok((Outcome::Unchanged, _)) => state.requeue.cancel(&task.id),
            // Someone else wrote first; their write produced a change event that brings us back.
            Err(ControllerError::Store(StoreError::Conflict { .. })) => {
                tracing::debug!(task = %task.id, "conflict; will reconcile again");
            }
            Err(e) => {
                tracing::error!(task = %task.id, error = %e, "reconcile failed; retried at resync")
            }
        }
    }
}

/// Sleeps until `at`; `None` never wakes (the select branch is disabled then anyway).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::DeviceIdentity;
    use crate::queue::sqlite::SqliteQueue;
    use crate::store::sqlite::{Db, SqliteStore};
    use crate::store::{Admission, NewTask};
    use agentplane_api::device::EdgeDeviceSpec;
    use agentplane_api::policy::{IntentRule, RateLimit, RateLimitAction, Scope};
    use agentplane_api::task::AgentTaskSpec;

    #[test]
    fn requeue_keeps_one_deadline_per_task_in_time_order() {
        let mut q = Requeue::default();
        let t0 = Instant::now();
        q.schedule("a", t0 + Duration::from_secs(5));
        q.schedule("b", t0 + Duration::from_secs(1));
        // Rescheduling replaces the earlier deadline instead of adding a second entry.
        q.schedule("a", t0 + Duration::from_secs(2));
        assert_eq!(q.len(), 2);
        assert_eq!(q.next(), Some(t0 + Duration::from_secs(1)));
        assert!(q.pop_due(t0).is_empty());
        assert_eq!(q.pop_due(t0 + Duration::from_secs(3)), ["b", "a"]);
        assert_eq!((q.len(), q.next()), (0, None));
        q.schedule("c", t0);
        q.cancel("c");
        assert_eq!((q.len(), q.next()), (0, None));
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<SqliteStore>,
        queue: Arc<SqliteQueue>,
        device: DeviceIdentity,
        seq: u64,
    }

    impl Fixture {
        async fn new(action: RateLimitAction) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
            let store = SqliteStore::new(db.clone(), "default");
            let queue = SqliteQueue::new(db, "tasks", None);
            let mut policy = crate::runtime::default_policy();
            policy.intents.push(IntentRule {
                kind: "summarize".into(),
                allowed: true,
                requires_approval: false,
                privacy_levels: vec![],
                rate_limits: vec![RateLimit {
                    scope: Scope::Device,
                    requests: 1,
                    period_seconds: 3600,
                }],
                on_rate_limit: action,
                tools: vec![],
                max_steps: None,
            });
            store.put_policy(policy).await.unwrap();
            let device = DeviceIdentity::generate("kiosk-1").unwrap();
            store
                .put_device(
                    "kiosk-1",
                    EdgeDeviceSpec {
                        public_keys: vec![device.public_key()],
                        owner: "o".into(),
                        allowed_intents: vec![],
                        revoked: false,
                    },
                )
                .await
                .unwrap();
            Fixture {
                _dir: dir,
                store,
                queue,
                device,
                seq: 0,
            }
        }

        /// `summarize` needs approval, and alice is the one approver.
        async fn awaiting_alices_approval() -> Fixture {
            let f = Fixture::new(RateLimitAction::Deny).await;
            let mut policy = f.store.get_policy().await.unwrap().unwrap();
            for rule in policy.intents.iter_mut().filter(|r| r.kind == "summarize") {
                rule.requires_approval = true;
                rule.rate_limits.clear();
            }
            policy.approvers = vec!["alice".into()];
            f.store.put_policy(policy).await.unwrap();
            f
        }

        /// A task whose decision was dropped: still waiting, no approval, and its `Approved` condition.
        async fn refused(
            &self,
            id: &str,
        ) -> (
            TaskRecord,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
        ) {
            let waiting = self.store.get_task(id).await.unwrap().unwrap();
            assert_eq!(waiting.phase(), TaskPhase::AwaitingApproval);
            assert!(waiting.status.approval.is_none());
            let cond = waiting
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "Approved")
                .unwrap()
                .clone();
            (waiting, cond)
        }

        async fn task(&mut self) -> TaskRecord {
            self.seq += 1;
            let payload = self.device.intent(self.seq, "summarize", "hi");
            let spec = AgentTaskSpec::for_payload(self.device.sign(&payload).unwrap(), &payload);
            let new = NewTask {
                id: payload.task_id.clone(),
                spec,
                seq: self.seq,
                trace_id: None,
            };
            match self.store.admit(new).await.unwrap() {
                Admission::Created(t) => t,
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_decision_by_someone_not_in_the_approvers_is_refused_at_decision_time() {
        let mut f = Fixture::awaiting_alices_approval().await;
        let task = f.task().await;
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &task).await.unwrap(),
            Outcome::Moved(TaskPhase::AwaitingApproval)
        );
        let decide = |who: &str| agentplane_api::task::Approval {
            decision: ApprovalDecision::Approved,
            approver: who.into(),
            decided_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
            comment: None,
            step: None,
            args_digest: None,
        };
        // A decision in the task's status, written by a component that may write status (a
        // worker): not a decision at all, only the controller's accepted record; nothing moves.
        let parked = f.store.get_task(&task.id).await.unwrap().unwrap();
        let mut status = parked.status.clone();
        status.approval = Some(decide("alice"));
        let in_status = write_status(&*f.store, &parked, status).await.unwrap();
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &in_status).await.unwrap(),
            Outcome::Unchanged
        );
        let mut status = in_status.status.clone();
        status.approval = None;
        write_status(&*f.store, &in_status, status).await.unwrap();
        // Recorded around the gateway by someone not in the policy's approvers: refused, once.
        f.store
            .record_decision(&task.id, decide("mallory"))
            .await
            .unwrap();
        let parked = f.store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &parked).await.unwrap(),
            Outcome::Unchanged
        );
        let (waiting, cond) = f.refused(&task.id).await;
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", "NotAnApprover")
        );
        assert!(cond.message.contains("mallory"), "{}", cond.message);
        // Judged again on the next reconcile, but the refusal is not written twice.
        reconcile(&*f.store, &*f.queue, &waiting).await.unwrap();
        let again = f.store.get_task(&task.id).await.unwrap().unwrap();
        assert_eq!(again.version, waiting.version);
        // The policy's approver's decision goes through, and becomes the task's accepted record.
        let alices = decide("alice");
        f.store
            .record_decision(&task.id, alices.clone())
            .await
            .unwrap();
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &again).await.unwrap(),
            Outcome::Moved(TaskPhase::Queued)
        );
        let queued = f.store.get_task(&task.id).await.unwrap().unwrap();
        let accepted = queued.status.approval.unwrap();
        assert_eq!(
            (accepted.approver, accepted.decision),
            (alices.approver, alices.decision)
        );
    }

    #[tokio::test]
    async fn a_step_decision_counts_only_for_the_pending_call_and_a_denial_names_the_step() {
        use agentplane_api::task::{PendingApproval, args_digest};
        let mut f = Fixture::awaiting_alices_approval().await;
        let args = |path: &str| {
            serde_json::json!({"path": path})
                .as_object()
                .unwrap()
                .clone()
        };
        let mut ids = Vec::new();
        for _ in 0..2 {
            let task = f.task().await;
            reconcile(&*f.store, &*f.queue, &task).await.unwrap();
            // The plan stopped at step 3, a destructive tool call (as the worker records it).
            let parked = f.store.get_task(&task.id).await.unwrap().unwrap();
            let mut status = parked.status.clone();
            status.pending_approval = Some(PendingApproval {
                step: 3,
                server: "files".into(),
                tool: "delete".into(),
                arguments: args("/tmp/a"),
                args_digest: args_digest(&args("/tmp/a")),
                requested_at: None,
            });
            write_status(&*f.store, &parked, status).await.unwrap();
            ids.push(task.id);
        }
        let decide = |decision, digest: String| agentplane_api::task::Approval {
            decision,
            approver: "alice".into(),
            decided_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
            comment: None,
            step: Some(3),
            args_digest: Some(digest),
        };
        let record = |id: &str, approval| {
            let store = f.store.clone();
            let id = id.to_owned();
            async move {
                store.record_decision(&id, approval).await.unwrap();
                store.get_task(&id).await.unwrap().unwrap()
            }
        };
        // Approving other arguments than the pending call's: refused, still waiting.
        let other = record(
            &ids[0],
            decide(ApprovalDecision::Approved, args_digest(&args("/etc"))),
        )
        .await;
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &other).await.unwrap(),
            Outcome::Unchanged
        );
        let (_, cond) = f.refused(&ids[0]).await;
        assert_eq!(cond.reason, "DecisionMismatch");
        // The exact call: approved, back to the queue.
        let exact = record(
            &ids[0],
            decide(ApprovalDecision::Approved, args_digest(&args("/tmp/a"))),
        )
        .await;
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &exact).await.unwrap(),
            Outcome::Moved(TaskPhase::Queued)
        );
        // The reason no longer says the task waits: it names the approved step.
        let queued = f.store.get_task(&ids[0]).await.unwrap().unwrap();
        assert_eq!(
            queued.status.reason.as_deref(),
            Some("step 3 (files/delete) approved by alice"),
        );
        // Denied: the reason names the step and the tool.
        let denied = record(
            &ids[1],
            decide(ApprovalDecision::Denied, args_digest(&args("/tmp/a"))),
        )
        .await;
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &denied).await.unwrap(),
            Outcome::Moved(TaskPhase::Denied)
        );
        let reason = f
            .store
            .get_task(&ids[1])
            .await
            .unwrap()
            .unwrap()
            .status
            .reason
            .unwrap();
        assert_eq!(reason, "denied by approver alice at step 3 (files/delete)");
    }

    #[tokio::test]
    async fn a_single_step_rebuilds_the_ledger_from_the_store() {
        let mut f = Fixture::new(RateLimitAction::Deny).await;
        let first = f.task().await;
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &first).await.unwrap(),
            Outcome::Moved(TaskPhase::Queued)
        );
        let queued = f.store.get_task(&first.id).await.unwrap().unwrap();
        let cond = &queued.status.conditions[0];
        assert_eq!(
            (
                cond.type_.as_str(),
                cond.status.as_str(),
                cond.reason.as_str()
            ),
            ("Admitted", "True", "WithinPolicy")
        );
        // No ledger is carried between the two calls: the second finds the first in the store.
        let second = f.task().await;
        assert_eq!(
            reconcile(&*f.store, &*f.queue, &second).await.unwrap(),
            Outcome::Moved(TaskPhase::Denied)
        );
        let denied = f.store.get_task(&second.id).await.unwrap().unwrap();
        let reason = denied.status.reason.unwrap();
        assert!(reason.starts_with("rate_limited: "), "{reason}");
        assert!(reason.ends_with("s"), "{reason}");
    }

    #[tokio::test]
    async fn a_held_task_is_marked_once_and_requeued() {
        let mut f = Fixture::new(RateLimitAction::Hold).await;
        let mut ledger = Ledger::default();
        let first = f.task().await;
        let (outcome, decision) = reconcile_with_ledger(&*f.store, &*f.queue, &first, &mut ledger)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Moved(TaskPhase::Queued));
        assert_eq!(
            decision,
            Some(AdmissionDecision::new("admitted", "within_policy"))
        );
        let second = f.task().await;
        let (outcome, decision) = reconcile_with_ledger(&*f.store, &*f.queue, &second, &mut ledger)
            .await
            .unwrap();
        let Outcome::RequeueAfter(after) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(after > Duration::from_secs(3590) && after <= Duration::from_secs(3600));
        assert_eq!(
            decision,
            Some(AdmissionDecision::new("held", "rate_limited"))
        );
        let held = f.store.get_task(&second.id).await.unwrap().unwrap();
        assert_eq!(held.phase(), TaskPhase::Pending);
        assert_eq!(held.status.conditions[0].reason, "RateLimited");
        // Looking again writes nothing new.
        let (outcome, _) = reconcile_with_ledger(&*f.store, &*f.queue, &held, &mut ledger)
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::RequeueAfter(_)));
        assert_eq!(
            f.store.get_task(&second.id).await.unwrap().unwrap().version,
            held.version
        );
    }
}
