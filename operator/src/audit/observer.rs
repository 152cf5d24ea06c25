//! The distributed mode's audit recorder: [`TaskObserver`] appends what the operator leader sees of
//! each task, and [`ObservedStore`] feeds it the leader's own writes.
//!
//! # Why the leader observes instead of every process recording its writes
//!
//! In the distributed runtime the gateway, the operator leader and the workers all write task
//! status, each in its own process. Wrapping each process's store in an [`super::AuditedStore`]
//! would split the history over as many logs as there are pods. Every write, whoever made it, comes
//! back to the leader through its watch, so the leader keeps the one log.
//!
//! # What is guaranteed to be recorded
//!
//! A watch delivers the latest state of an object, and kube-rs coalesces changes that arrive while a
//! reconcile of the same object runs, so a state that lasted a moment (a worker's Running before a
//! quick Succeeded) may never be seen. What the log always holds, per task:
//!
//! - the admission (the task's first sighting, stamped with its creation time);
//! - every decision the leader made (admission verdicts: Denied, AwaitingApproval, Queued; rate-limit
//!   holds; cancellations it carried out), recorded from its own writes through [`ObservedStore`]
//!   right after they commit;
//! - the approval and the cancel request: both stay in the object once made, so any later sighting
//!   records them;
//! - the terminal phase: it never changes, and the controller reconciles every task when it starts
//!   leading, so a terminal state reached while no leader ran is recorded by the next one.
//!
//! Intermediate phases written by others (Queued -> Running, redelivery passes) are recorded when the
//! leader saw them. Each event says what was observed (`details.observedVersion`, the
//! resourceVersion); `from` is the phase this process last recorded for the task, absent when it
//! had not seen the task before.
//!
//! # Keys
//!
//! Keys are derived from the state, not the resourceVersion, so seeing the same state again (a
//! resync, a status write that changed only a condition, a new leader re-listing) adds nothing:
//! `ns/task/admitted`, `ns/task/cancel-requested`, `ns/task/held/<hash of the reason>`,
//! `ns/task/approval`, and `ns/task@<phase>#<receiveCount>` for each phase after Pending. The receive
//! count keeps every pass of a redelivered task distinct (Running#1, Running#2).
//!
//! # Failures
//!
//! As in [`super::AuditedStore`], events that could not be appended are kept in a bounded backlog and
//! retried first; while it cannot be emptied, [`TaskObserver::observe`] fails (so the reconcile is
//! retried) and [`ObservedStore`] refuses writes before they reach the store: no decision is taken
//! that the log cannot record.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agentplane_api::TaskPhase;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{AgentPolicySpec, AgentPolicyStatus, BreakerTrip};
use agentplane_api::task::{AgentTaskStatus, Approval};
use async_trait::async_trait;
use jiff::Timestamp;
use serde_json::json;
use sha2::Digest as _;
use tokio::sync::broadcast;

use super::log::{AuditLog, LogError};
use super::{AuditEvent, EventKind};
use crate::store::{
    Admission, DecisionRecord, DeviceRecord, DynStore, EnrollOutcome, Enrollment, NewTask,
    StoreError, TaskChanged, TaskRecord, TaskStore, Version,
};

/// Most events kept for retry after append failures; beyond this the oldest are dropped (and counted).
const MAX_BACKLOG: usize = 10_000;

/// Most tasks whose last recorded state is remembered (only a cache: forgetting costs idempotent
/// appends that add nothing).
const MAX_SEEN: usize = 50_000;

/// The parts of a task's state that make audit events.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    phase: TaskPhase,
    receive_count: u32,
    approval: bool,
    cancel: bool,
    held: Option<String>,
}

impl Seen {
    fn of(t: &TaskRecord) -> Self {
        Seen {
            phase: t.phase(),
            receive_count: receive_count(&t.status),
            approval: t.status.approval.is_some(),
            cancel: t.spec.cancel_requested(),
            held: super::held_reason(&t.status).map(str::to_owned),
        }
    }
}

fn receive_count(status: &AgentTaskStatus) -> u32 {
    status.queue.as_ref().map_or(0, |q| q.receive_count)
}

/// Records the states of the tasks of one namespace as they are observed.
pub struct TaskObserver {
    log: Arc<AuditLog>,
    namespace: String,
    seen: Mutex<HashMap<String, Seen>>,
    backlog: Mutex<VecDeque<(String, AuditEvent)>>,
    /// One flush of the backlog at a time, so its events keep their order.
    flushing: tokio::sync::Mutex<()>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for TaskObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskObserver")
            .field("log", &self.log.path())
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl TaskObserver {
    pub fn new(log: Arc<AuditLog>, namespace: impl Into<String>) -> Arc<Self> {
        Arc::new(TaskObserver {
            log,
            namespace: namespace.into(),
            seen: Mutex::new(HashMap::new()),
            backlog: Mutex::new(VecDeque::new()),
            flushing: tokio::sync::Mutex::new(()),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    /// Events waiting in the backlog.
    pub fn pending(&self) -> usize {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Events dropped because the backlog was full: gaps in the log.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records what `task` shows that this observer has not recorded yet; returns the number of new
    /// leaves. Fails while earlier events cannot be appended (they are kept and retried first).
    pub async fn observe(&self, task: &TaskRecord) -> Result<usize, LogError> {
        self.flush().await?;
        let now = Seen::of(task);
        let events = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let prior = seen.get(&task.id);
            if prior == Some(&now) {
                return Ok(0);
            }
            let events = self.events(task, prior, &now);
            if seen.len() >= MAX_SEEN && prior.is_none() {
                seen.clear();
            }
            seen.insert(task.id.clone(), now);
            events
        };
        self.append_all(events).await
    }

    /// Retries the backlog, oldest first.
    async fn flush(&self) -> Result<(), LogError> {
        if self.pending() == 0 {
            return Ok(());
        }
        let _one = self.flushing.lock().await;
        loop {
            let next = self
                .backlog
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .front()
                .cloned();
            let Some((key, event)) = next else {
                return Ok(());
            };
            self.log.append(key, event).await?;
            self.backlog
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
        }
    }

    async fn append_all(&self, events: Vec<(String, AuditEvent)>) -> Result<usize, LogError> {
        let mut added = 0;
        let mut events = events.into_iter();
        while let Some((key, event)) = events.next() {
            match self.log.append(key.clone(), event.clone()).await {
                Ok(a) => added += usize::from(a.new),
                Err(e) => {
                    tracing::error!(error = %e, task = %event.task, "audit append failed; kept for retry");
                    self.keep(std::iter::once((key, event)).chain(events));
                    return Err(e);
                }
            }
        }
        Ok(added)
    }

    fn keep(&self, events: impl Iterator<Item = (String, AuditEvent)>) {
        let mut backlog = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        for e in events {
            if backlog.len() >= MAX_BACKLOG
                && let Some((key, _)) = backlog.pop_front()
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!(key = %key, "audit backlog full: event dropped, the log has a gap");
            }
            backlog.push_back(e);
        }
    }

    fn key(&self, task: &str, suffix: &str) -> String {
        format!("{}/{task}{suffix}", self.namespace)
    }

    fn event(&self, kind: EventKind, task: &TaskRecord) -> AuditEvent {
        AuditEvent::new(kind, &self.namespace, &task.id)
    }

    /// The events that take the record of `task` from `prior` (what was recorded last, if known) to
    /// `now`, oldest cause first. With no `prior` every event the state implies is produced; the keys
    /// make the ones already in the log no-ops.
    fn events(
        &self,
        task: &TaskRecord,
        prior: Option<&Seen>,
        now: &Seen,
    ) -> Vec<(String, AuditEvent)> {
        let status = &task.status;
        let version = &task.version;
        let mut out = Vec::new();
        if prior.is_none() {
            let mut e = self.event(EventKind::Admission, task);
            e.to = Some(TaskPhase::Pending);
            e.actor = Some(format!("device/{}", task.spec.device_ref.name));
            e.details = json!({
                "userId": task.spec.user_id,
                "intentType": task.spec.intent_type,
                "privacyLevel": task.spec.privacy_level,
                "createdAt": task.created_at,
                "traceId": status.trace_id,
            });
            out.push((self.key(&task.id, "/admitted"), e));
        }
        if now.cancel && !prior.is_some_and(|p| p.cancel) {
            let mut e = self.event(EventKind::Decision, task);
            e.from = Some(now.phase);
            e.reason = Some("cancel requested".into());
            e.details = json!({ "observedVersion": version.0 });
            out.push((self.key(&task.id, "/cancel-requested"), e));
        }
        if let Some(held) = &now.held
            && prior.and_then(|p| p.held.as_ref()) != Some(held)
        {
            let mut e = self.event(EventKind::Decision, task);
            e.from = Some(TaskPhase::Pending);
            e.to = Some(TaskPhase::Pending);
            e.reason = Some(held.clone());
            e.details = json!({ "decision": "held", "observedVersion": version.0 });
            let digest = hex::encode(&sha2::Sha256::digest(held.as_bytes())[..8]);
            out.push((self.key(&task.id, &format!("/held/{digest}")), e));
        }
        if let Some(approval) = &status.approval
            && !prior.is_some_and(|p| p.approval)
        {
            let mut e = self.event(EventKind::Approval, task);
            e.actor = Some(approval.approver.clone());
            e.reason = approval.comment.clone();
            e.details = json!({
                "decision": approval.decision,
                "decidedAt": approval.decided_at,
                "observedVersion": version.0,
            });
            out.push((self.key(&task.id, "/approval"), e));
        }
        let pass_changed =
            prior.is_none_or(|p| (p.phase, p.receive_count) != (now.phase, now.receive_count));
        if now.phase != TaskPhase::Pending && pass_changed {
            // The admission verdict is a policy decision. A Queued or Denied task with an approval
            // got there through the approver (recorded above), so that move is a transition.
            let kind = match now.phase {
                TaskPhase::AwaitingApproval => EventKind::Decision,
                TaskPhase::Queued | TaskPhase::Denied if status.approval.is_none() => {
                    EventKind::Decision
                }
                _ => EventKind::Transition,
            };
            let mut e = self.event(kind, task);
            e.from = prior.map(|p| p.phase).filter(|p| *p != now.phase);
            e.to = Some(now.phase);
            e.reason = status.reason.clone();
            let mut details = serde_json::Map::new();
            details.insert("observedVersion".into(), json!(version.0));
            details.insert("receiveCount".into(), json!(now.receive_count));
            if let Some(m) = &status.model {
                details.insert("model".into(), json!(m));
            }
            if now.phase.is_terminal()
                && let Some(u) = &status.usage
            {
                details.insert("usage".into(), json!(u));
            }
            if let Some(t) = &status.trace_id {
                details.insert("traceId".into(), json!(t));
            }
            if kind == EventKind::Decision {
                super::insert_rego_verdict(&mut details, status);
            }
            e.details = serde_json::Value::Object(details);
            let suffix = format!("@{}#{}", now.phase.as_str(), now.receive_count);
            out.push((self.key(&task.id, &suffix), e));
        }
        out
    }
}

/// A [`TaskStore`] that hands every task it writes to a [`TaskObserver`] right after the write
/// commits, so the leader's own decisions are recorded exactly, whether or not the watch later shows
/// them. Everything else is delegated.
pub struct ObservedStore {
    inner: DynStore,
    observer: Arc<TaskObserver>,
}

impl ObservedStore {
    pub fn new(inner: DynStore, observer: Arc<TaskObserver>) -> Arc<Self> {
        Arc::new(ObservedStore { inner, observer })
    }

    /// Refuses (before any store write) while earlier events cannot be appended.
    async fn ready(&self) -> Result<(), StoreError> {
        self.observer.flush().await.map_err(|e| {
            StoreError::Backend(format!(
                "audit log unavailable ({} events waiting to be recorded), refusing writes: {e}",
                self.observer.pending()
            ))
        })
    }

    /// Records a task the inner store just wrote. The write has committed: a failure here is
    /// reported as a backend error (callers re-read, and their writes are conditional), and the
    /// events stay in the backlog.
    async fn record(&self, t: &TaskRecord) -> Result<(), StoreError> {
        self.observer.observe(t).await.map(|_| ()).map_err(|e| {
            StoreError::Backend(format!(
                "task {}: the write committed but its audit record could not be appended (kept for retry): {e}",
                t.id
            ))
        })
    }
}

#[async_trait]
impl TaskStore for ObservedStore {
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    async fn admit(&self, task: NewTask) -> Result<Admission, StoreError> {
        self.ready().await?;
        let admission = self.inner.admit(task).await?;
        if let Admission::Created(t) | Admission::Existing(t) = &admission {
            self.record(t).await?;
        }
        Ok(admission)
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.inner.get_task(id).await
    }

    async fn list_unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.inner.list_unfinished().await
    }

    async fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.inner.list_tasks().await
    }

    async fn update_task_status(
        &self,
        id: &str,
        expected: &Version,
        status: AgentTaskStatus,
    ) -> Result<TaskRecord, StoreError> {
        self.ready().await?;
        let written = self.inner.update_task_status(id, expected, status).await?;
        self.record(&written).await?;
        Ok(written)
    }

    async fn request_cancel(&self, id: &str) -> Result<TaskRecord, StoreError> {
        self.ready().await?;
        let t = self.inner.request_cancel(id).await?;
        self.record(&t).await?;
        Ok(t)
    }

    async fn record_decision(
        &self,
        task_id: &str,
        approval: Approval,
    ) -> Result<DecisionRecord, StoreError> {
        // A decision is recorded in the log when the controller accepts it into the task's status.
        self.inner.record_decision(task_id, approval).await
    }

    async fn decisions(&self, task_id: &str) -> Result<Vec<DecisionRecord>, StoreError> {
        self.inner.decisions(task_id).await
    }

    async fn get_device(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.inner.get_device(name).await
    }

    async fn put_device(
        &self,
        name: &str,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError> {
        self.inner.put_device(name, spec).await
    }

    async fn update_device_spec(
        &self,
        name: &str,
        expected: &crate::store::Version,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError> {
        self.inner.update_device_spec(name, expected, spec).await
    }

    async fn enroll(&self, enrollment: Enrollment) -> Result<EnrollOutcome, StoreError> {
        self.inner.enroll(enrollment).await
    }

    async fn add_join_token(
        &self,
        token_hash: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.add_join_token(token_hash, expires_at).await
    }

    async fn get_policy(&self) -> Result<Option<AgentPolicySpec>, StoreError> {
        self.inner.get_policy().await
    }

    async fn put_policy(&self, spec: AgentPolicySpec) -> Result<(), StoreError> {
        self.inner.put_policy(spec).await
    }

    async fn trip_breaker(&self, trip: BreakerTrip) -> Result<bool, StoreError> {
        self.ready().await?;
        let event = super::breaker_event(self.inner.namespace(), &trip);
        let tripped = self.inner.trip_breaker(trip).await?;
        if tripped {
            self.observer
                .append_all(vec![event])
                .await
                .map_err(|e| {
                    StoreError::Backend(format!(
                        "the circuit breaker's trip committed but its audit record could not be appended (kept for retry): {e}"
                    ))
                })?;
        }
        Ok(tripped)
    }

    async fn policy_status(&self) -> Result<Option<AgentPolicyStatus>, StoreError> {
        self.inner.policy_status().await
    }

    fn changes(&self) -> broadcast::Receiver<TaskChanged> {
        self.inner.changes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::Ed25519Signer;
    use crate::audit::log::AuditLogConfig;
    use agentplane_api::task::{Approval, ApprovalDecision, QueueStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn task(version: &str, phase: TaskPhase) -> TaskRecord {
        let mut t = crate::store::test_task(
            "t1",
            AgentTaskStatus {
                phase: Some(phase),
                ..AgentTaskStatus::default()
            },
        );
        t.spec.intent_type = "purchase".into();
        t.version = Version(version.into());
        t
    }

    fn with_pass(mut t: TaskRecord, receive_count: u32) -> TaskRecord {
        t.status.queue = Some(QueueStatus {
            message_id: Some("m".into()),
            receive_count,
        });
        t
    }

    async fn observer(dir: &std::path::Path) -> Arc<TaskObserver> {
        let log = AuditLog::open(
            AuditLogConfig::new(dir.join("audit.sqlite"), "agentplane.dev/audit/ns"),
            Arc::new(Ed25519Signer::from_seed([3; 32])),
        )
        .await
        .unwrap();
        TaskObserver::new(log, "ns")
    }

    async fn transcript(log: &AuditLog) -> Vec<(EventKind, Option<TaskPhase>, Option<String>)> {
        let mut out = Vec::new();
        for seq in 0..log.size().await.unwrap() {
            let e = log.leaf(seq).await.unwrap().unwrap().event().unwrap();
            out.push((e.kind, e.to, e.actor));
        }
        out
    }

    #[tokio::test]
    async fn records_each_observed_state_once_and_every_redelivery_pass() {
        let dir = tempfile::tempdir().unwrap();
        let obs = observer(dir.path()).await;
        // First sighting already Queued: admission, then the verdict.
        assert_eq!(obs.observe(&task("5", TaskPhase::Queued)).await.unwrap(), 2);
        // The same state again, or a write that changed nothing the log records: nothing.
        assert_eq!(obs.observe(&task("5", TaskPhase::Queued)).await.unwrap(), 0);
        assert_eq!(obs.observe(&task("6", TaskPhase::Queued)).await.unwrap(), 0);
        let run1 = with_pass(task("7", TaskPhase::Running), 1);
        assert_eq!(obs.observe(&run1).await.unwrap(), 1);
        // A status write during the pass (a failed attempt's reason) is the same pass.
        let mut retry = with_pass(task("8", TaskPhase::Running), 1);
        retry.status.reason = Some("attempt 1 failed".into());
        assert_eq!(obs.observe(&retry).await.unwrap(), 0);
        // Redelivered: a second Running pass is its own leaf.
        let run2 = with_pass(task("9", TaskPhase::Running), 2);
        assert_eq!(obs.observe(&run2).await.unwrap(), 1);
        let done = with_pass(task("10", TaskPhase::Succeeded), 2);
        assert_eq!(obs.observe(&done).await.unwrap(), 1);

        // A new observer (a new leader) over the same log adds nothing for a state already recorded.
        let again = TaskObserver::new(obs.log().clone(), "ns");
        assert_eq!(again.observe(&done).await.unwrap(), 0);

        let log = obs.log();
        let kinds: Vec<_> = transcript(log)
            .await
            .into_iter()
            .map(|(k, to, _)| (k, to))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (EventKind::Admission, Some(TaskPhase::Pending)),
                (EventKind::Decision, Some(TaskPhase::Queued)),
                (EventKind::Transition, Some(TaskPhase::Running)),
                (EventKind::Transition, Some(TaskPhase::Running)),
                (EventKind::Transition, Some(TaskPhase::Succeeded)),
            ]
        );
        let last = log.leaf(4).await.unwrap().unwrap().event().unwrap();
        assert_eq!(last.from, Some(TaskPhase::Running));
        assert_eq!(last.details["observedVersion"], "10");
        assert_eq!(last.details["receiveCount"], 2);
    }

    #[tokio::test]
    async fn approvals_cancels_and_holds_are_recorded_even_when_seen_late() {
        let dir = tempfile::tempdir().unwrap();
        let obs = observer(dir.path()).await;
        // Held by a rate limit while Pending.
        let mut held = task("2", TaskPhase::Pending);
        held.status
            .conditions
            .push(crate::policy::ledger::admission_condition(
                false,
                "RateLimited",
                "held until the rate limit has room: 5 per 60s",
                Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(obs.observe(&held).await.unwrap(), 2);
        // Approved, then queued: both seen only in the Queued state (coalesced), approval first.
        let mut queued = task("4", TaskPhase::Queued);
        queued.status.approval = Some(Approval {
            decision: ApprovalDecision::Approved,
            approver: "alice".into(),
            decided_at: Time(Timestamp::UNIX_EPOCH),
            comment: Some("ok".into()),
            step: None,
            args_digest: None,
        });
        assert_eq!(obs.observe(&queued).await.unwrap(), 2);
        let mut cancelled = queued.clone();
        cancelled.version = Version("6".into());
        cancelled.spec.cancel = Some(true);
        cancelled.status.phase = Some(TaskPhase::Cancelled);
        assert_eq!(obs.observe(&cancelled).await.unwrap(), 2);
        let got = transcript(obs.log()).await;
        assert_eq!(
            got,
            vec![
                (
                    EventKind::Admission,
                    Some(TaskPhase::Pending),
                    Some("device/kiosk".into())
                ),
                (EventKind::Decision, Some(TaskPhase::Pending), None),
                (EventKind::Approval, None, Some("alice".into())),
                // Queued through the approver: a transition, not an admission verdict.
                (EventKind::Transition, Some(TaskPhase::Queued), None),
                (EventKind::Decision, None, None),
                (EventKind::Transition, Some(TaskPhase::Cancelled), None),
            ]
        );
    }

    #[tokio::test]
    async fn the_observed_store_records_its_own_writes_and_fails_closed() {
        use crate::store::sqlite::{Db, SqliteStore};
        let dir = tempfile::tempdir().unwrap();
        let obs = observer(dir.path()).await;
        let inner: DynStore =
            SqliteStore::new(Db::open(&dir.path().join("db.sqlite")).unwrap(), "ns");
        inner
            .put_device(
                "kiosk",
                EdgeDeviceSpec {
                    public_keys: vec![agentplane_api::device::PublicKey {
                        id: "k1".into(),
                        alg: agentplane_api::device::KeyAlgorithm::Ed25519,
                        key: "A".repeat(44),
                        not_after: None,
                    }],
                    owner: "o".into(),
                    allowed_intents: vec![],
                    revoked: false,
                },
            )
            .await
            .unwrap();
        let store = ObservedStore::new(inner, obs.clone());
        let t = task("0", TaskPhase::Pending);
        let Admission::Created(t) = store
            .admit(NewTask {
                id: t.id.clone(),
                spec: t.spec.clone(),
                seq: 1,
                trace_id: None,
            })
            .await
            .unwrap()
        else {
            panic!("not created")
        };
        let queued = crate::store::write_status(
            &*store,
            &t,
            AgentTaskStatus {
                phase: Some(TaskPhase::Queued),
                ..t.status.clone()
            },
        )
        .await
        .unwrap();
        assert_eq!(obs.log().size().await.unwrap(), 2);

        // The log goes away: the write that committed reports the failure, and the next is refused
        // before it reaches the store.
        obs.log().close().await.unwrap();
        let running = AgentTaskStatus {
            phase: Some(TaskPhase::Running),
            ..queued.status.clone()
        };
        let err = store
            .update_task_status(&queued.id, &queued.version, running.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("could not be appended"), "{err}");
        assert_eq!(obs.pending(), 1);
        let now = store.get_task(&queued.id).await.unwrap().unwrap();
        let err = store
            .update_task_status(&now.id, &now.version, now.status.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("refusing writes"), "{err}");
        let after = store.get_task(&queued.id).await.unwrap().unwrap();
        assert_eq!(
            after.version, now.version,
            "the refused write never reached the store"
        );
    }
}
