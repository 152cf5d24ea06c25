//! [`AuditedStore`]: a [`TaskStore`] that records every admission, phase transition, approval and cancel
//! request in the audit log, right after the underlying write commits.
//!
//! # When the audit append fails
//!
//! The store write has already committed when the append runs (the log is a separate file, or in the
//! distributed mode a separate system: there is no shared transaction). A leaf that is never appended is
//! a gap the verifier cannot see, so losing one silently is the worst outcome. The wrapper therefore:
//!
//! 1. returns [`StoreError::Backend`] for that write, naming the audit failure. Callers already handle a
//!    write that committed but was not acknowledged — a crash or a lost response does the same — by
//!    re-reading, and their writes are conditional, so the error cannot cause a double effect;
//! 2. keeps the unappended events in a bounded in-memory backlog, oldest first;
//! 3. fails closed: while the backlog is not empty, every further write first retries the backlog and is
//!    refused, before touching the store, if that still fails. No new unaudited write can happen, and a
//!    transient fault (disk full, a moment of I/O errors) heals without a gap;
//! 4. counts failures ([`AuditedStore::append_failures`]) for metrics and logs each one.
//!
//! What remains invisible is a process crash between the store commit and the append (or with a
//! backlog). Admissions heal on resubmission (an `Existing` admission re-appends its idempotent event).
//!
//! [`AuditedStore::pipelined`] (what `agentplane dev` runs) returns once the events are queued to the
//! log, and learns of a failed append from the log afterwards: the failing write itself then
//! succeeds, and the writes after the failure is known are refused. Its crash window is the queue
//! (milliseconds).
//!
//! # Event keys and `auditSeq`
//!
//! Keys are `ns/task/admitted`, `ns/task@<version>/phase`, `ns/task@<version>/approval`,
//! `ns/task@<version>/held` (a rate limit holding the task) and `ns/task/cancel-requested`. Versions are unique per write (a resourceVersion in Kubernetes), so the
//! redelivery edge Running -> Queued -> Running records every pass while a replay of the same write is
//! recorded once. The record returned by a write carries `status.auditSeq` = the seq of the leaf just
//! appended (not persisted by that write, which had committed already); callers derive their next status
//! from it, so the next write of the task stores it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use agentplane_api::TaskPhase;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{AgentPolicySpec, AgentPolicyStatus, BreakerTrip};
use agentplane_api::task::{AgentTaskStatus, Approval};
use async_trait::async_trait;
use jiff::Timestamp;
use serde_json::json;
use tokio::sync::broadcast;

use super::log::{AuditLog, DetachedFailures, LogError};
use super::{AuditEvent, EventKind};
use crate::store::{
    Admission, DecisionRecord, DeviceRecord, DynStore, EnrollOutcome, Enrollment, NewTask,
    StoreError, TaskChanged, TaskRecord, TaskStore, Version,
};

/// Most events kept for retry after append failures; beyond this the oldest are dropped (and counted).
const MAX_BACKLOG: usize = 10_000;

/// Most tasks whose last seen phase is remembered (to know a write's `from` phase without a read).
const MAX_KNOWN: usize = 50_000;

/// Per-task write locks, by hash of the task id (see [`AuditedStore::stripe`]).
const STRIPES: usize = 256;

/// Whether two approvals are the same decision. The store keeps `decidedAt` to the second (a
/// Kubernetes `Time`), so a record read back differs from the one written in its sub-second part:
/// comparing whole values would take a re-read approval for a new one.
fn same_approval(a: Option<&Approval>, b: Option<&Approval>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.decision == b.decision
                && a.approver == b.approver
                && a.comment == b.comment
                && a.decided_at.0.as_second() == b.decided_at.0.as_second()
        }
        _ => false,
    }
}

/// What the wrapper last saw of a task.
#[derive(Clone)]
struct Known {
    version: Version,
    phase: TaskPhase,
    approval: Option<Approval>,
    held: Option<String>,
    /// Plan steps the gate refused (each refusal is one `decision` leaf).
    denied_steps: Vec<u32>,
}

impl Known {
    fn of(t: &TaskRecord) -> Self {
        Known {
            version: t.version.clone(),
            phase: t.phase(),
            approval: t.status.approval.clone(),
            held: super::held_reason(&t.status).map(str::to_owned),
            denied_steps: super::denied_steps(&t.status).map(|s| s.index).collect(),
        }
    }
}

pub struct AuditedStore {
    inner: DynStore,
    log: Arc<AuditLog>,
    backlog: Mutex<VecDeque<(String, AuditEvent)>>,
    backlog_len: AtomicUsize,
    flushing: tokio::sync::Mutex<()>,
    failures: AtomicU64,
    dropped: AtomicU64,
    known: Mutex<HashMap<String, Known>>,
    /// Held from a task's write until its events are appended, so the log has each task's events
    /// in the order its writes committed: without it, a worker reacting to a committed write could
    /// append its own event before the writer appended the one it reacted to.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Pipelined mode: where the log leaves the appends that failed (see [`AuditedStore::pipelined`]).
    detached: Option<Arc<DetachedFailures>>,
}

impl AuditedStore {
    /// A store whose writes return once their audit events are appended and fsynced: the returned
    /// record carries `status.auditSeq`, and a failed append fails the write that produced it.
    pub fn new(inner: DynStore, log: Arc<AuditLog>) -> Arc<Self> {
        Arc::new(Self::build(inner, log, None))
    }

    /// A store whose writes return once their audit events are *queued* to the log (in commit order
    /// per task, as in [`Self::new`]). An append that fails is left by the log in a sink this store
    /// empties before every write: the event goes to the backlog, and from then on writes are refused
    /// until it is appended (fail closed, as in [`Self::new`], a write or so later). What this trades:
    /// the returned record carries no `auditSeq`, and a process crash loses the events still queued
    /// (milliseconds of writes) as well as the one being appended, which [`Self::new`] also loses.
    /// What it buys: a writer waits neither for the log's commit nor its fsync, so a serial writer
    /// (the embedded controller) is not held to the log's pace. Call [`Self::settle`] before closing
    /// the log.
    pub fn pipelined(inner: DynStore, log: Arc<AuditLog>) -> Arc<Self> {
        let sink = Arc::new(DetachedFailures::default());
        Arc::new(Self::build(inner, log, Some(sink)))
    }

    fn build(inner: DynStore, log: Arc<AuditLog>, detached: Option<Arc<DetachedFailures>>) -> Self {
        AuditedStore {
            inner,
            log,
            backlog: Mutex::new(VecDeque::new()),
            backlog_len: AtomicUsize::new(0),
            flushing: tokio::sync::Mutex::new(()),
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            known: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            detached,
        }
    }

    /// Waits until every append queued so far has been committed or has failed (failures are in
    /// the backlog by then). Immediate for a store made with [`Self::new`].
    pub async fn settle(&self) {
        if self.detached.is_none() {
            return;
        }
        // Jobs run in the order they were queued: once this answers, every append before it has.
        if let Err(e) = self.log.size().await {
            tracing::debug!(error = %e, "audit log closed while settling");
        }
        self.collect_failures();
    }

    /// Moves the pipelined appends that failed into the backlog.
    fn collect_failures(&self) {
        let Some(sink) = &self.detached else { return };
        if !sink.any() {
            return;
        }
        for (key, event, e) in sink.take() {
            self.failed(&e, std::iter::once((key, event)));
        }
    }

    /// Appends the backlog now; fails while it cannot be emptied.
    pub async fn retry_backlog(&self) -> Result<(), StoreError> {
        self.ready().await
    }

    /// An append that failed after its write committed: counted, logged, kept for retry.
    fn failed(&self, e: &LogError, events: impl Iterator<Item = (String, AuditEvent)>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut events = events.peekable();
        let task = events
            .peek()
            .map(|(_, e)| e.task.clone())
            .unwrap_or_default();
        self.keep(events);
        tracing::error!(
            error = %e,
            task = %task,
            "audit append failed after the store write committed; kept for retry"
        );
    }

    /// The write lock of task `id`.
    fn stripe(&self, id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        let hash =
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id);
        &self.stripes[(hash % STRIPES as u64) as usize]
    }

    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    /// Appends that failed after their write committed (each is retried from the backlog).
    pub fn append_failures(&self) -> u64 {
        self.collect_failures();
        self.failures.load(Ordering::Relaxed)
    }

    /// Events waiting in the backlog.
    pub fn pending(&self) -> usize {
        self.collect_failures();
        self.backlog_len.load(Ordering::Relaxed)
    }

    /// Events dropped because the backlog was full: gaps in the log.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn remember(&self, t: &TaskRecord) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if t.phase().is_terminal() {
            known.remove(&t.id);
            return;
        }
        if known.len() >= MAX_KNOWN && !known.contains_key(&t.id) {
            // Only a cache: forgetting costs one read per write until it refills.
            known.clear();
        }
        known.insert(t.id.clone(), Known::of(t));
    }

    /// The task as it is at `expected`, from the cache or the store.
    async fn prior(&self, id: &str, expected: &Version) -> Result<Option<Known>, StoreError> {
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|k| &k.version == expected)
            .cloned();
        if cached.is_some() {
            return Ok(cached);
        }
        // If the stored version differs, the conditional write below fails anyway.
        Ok(self
            .inner
            .get_task(id)
            .await?
            .filter(|t| &t.version == expected)
            .map(|t| Known::of(&t)))
    }

    /// Retries the backlog; refuses (before any store write) while it cannot be emptied.
    async fn ready(&self) -> Result<(), StoreError> {
        self.collect_failures();
        if self.backlog_len.load(Ordering::Acquire) == 0 {
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
            match self.log.append(key, event).await {
                Ok(_) => {
                    self.backlog
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pop_front();
                    self.backlog_len.fetch_sub(1, Ordering::Release);
                }
                Err(e) => {
                    return Err(StoreError::Backend(format!(
                        "audit log unavailable ({} events waiting to be recorded), refusing writes: {e}",
                        self.pending()
                    )));
                }
            }
        }
    }

    /// Appends `events` in order; returns the seq of the last.
    /// Appends `events` in order (pipelined: queues them); returns the seq of the last, when known.
    async fn record(&self, events: Vec<(String, AuditEvent)>) -> Result<Option<u64>, StoreError> {
        let mut last = None;
        let mut events = events.into_iter();
        while let Some((key, event)) = events.next() {
            let task = event.task.clone();
            let result = match &self.detached {
                None => self.log.append(key.clone(), event.clone()).await.map(|a| {
                    last = Some(a.seq);
                }),
                Some(sink) => {
                    self.log
                        .enqueue_detached(key.clone(), event.clone(), sink)
                        .await
                }
            };
            if let Err(e) = result {
                self.failed(&e, std::iter::once((key, event)).chain(events));
                return Err(StoreError::Backend(format!(
                    "task {task}: the write committed but its audit record could not be appended (kept for retry): {e}"
                )));
            }
        }
        Ok(last)
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
        self.backlog_len.store(backlog.len(), Ordering::Release);
    }

    fn event(&self, kind: EventKind, task: &str) -> AuditEvent {
        AuditEvent::new(kind, self.inner.namespace(), task)
    }

    fn key(&self, task: &str, suffix: &str) -> String {
        format!("{}/{task}{suffix}", self.inner.namespace())
    }

    fn admission_event(&self, task: &NewTask) -> (String, AuditEvent) {
        let mut e = self.event(EventKind::Admission, &task.id);
        e.to = Some(TaskPhase::Pending);
        e.actor = Some(format!("device/{}", task.spec.device_ref.name));
        e.details = json!({
            "userId": task.spec.user_id,
            "intentType": task.spec.intent_type,
            "privacyLevel": task.spec.privacy_level,
            "deviceSeq": task.seq,
            "traceId": task.trace_id,
        });
        (self.key(&task.id, "/admitted"), e)
    }

    /// The events one status write produced: an approval if one appeared or changed, then the phase move.
    fn status_events(&self, prior: &Known, written: &TaskRecord) -> Vec<(String, AuditEvent)> {
        let status: &AgentTaskStatus = &written.status;
        let (from, to) = (prior.phase, written.phase());
        let version = &written.version;
        let mut out = Vec::new();
        if let Some(approval) = &status.approval
            && !same_approval(prior.approval.as_ref(), Some(approval))
        {
            let mut e = self.event(EventKind::Approval, &written.id);
            e.from = Some(from);
            e.to = Some(to);
            e.actor = Some(approval.approver.clone());
            e.reason = approval.comment.clone();
            e.details = json!({
                "decision": approval.decision,
                "decidedAt": approval.decided_at,
                "version": version.0,
            });
            out.push((self.key(&written.id, &format!("@{version}/approval")), e));
        }
        // A rate limit holding a pending task is a decision too, though the phase stays Pending.
        if to == TaskPhase::Pending
            && let Some(held) = super::held_reason(status)
            && prior.held.as_deref() != Some(held)
        {
            let mut e = self.event(EventKind::Decision, &written.id);
            e.from = Some(from);
            e.to = Some(to);
            e.reason = Some(held.to_owned());
            e.details = json!({ "decision": "held", "version": version.0 });
            out.push((self.key(&written.id, &format!("@{version}/held")), e));
        }
        // A tool call the plan's gate refused (allow-list, rate limit, Rego) is a policy decision
        // too, though the plan goes on: its reason names the rule (a Rego denial its digest).
        for step in super::denied_steps(status).filter(|s| !prior.denied_steps.contains(&s.index)) {
            let mut e = self.event(EventKind::Decision, &written.id);
            e.from = Some(from);
            e.to = Some(to);
            e.reason = step.error.clone();
            e.details = json!({
                "decision": "denied",
                "step": step.index,
                "tool": step.name,
                "argsDigest": step.args_digest,
                "version": version.0,
            });
            let suffix = format!("@{version}/step/{}", step.index);
            out.push((self.key(&written.id, &suffix), e));
        }
        if from != to {
            // Admission control's verdict on a pending task is a policy decision; the rest are moves
            // of the machine (including the ones an approval causes, recorded just above).
            let kind = match (from, to) {
                (
                    TaskPhase::Pending,
                    TaskPhase::Denied | TaskPhase::AwaitingApproval | TaskPhase::Queued,
                ) => EventKind::Decision,
                _ => EventKind::Transition,
            };
            let mut e = self.event(kind, &written.id);
            e.from = Some(from);
            e.to = Some(to);
            e.reason = status.reason.clone();
            let mut details = serde_json::Map::new();
            details.insert("version".into(), json!(version.0));
            if let Some(m) = &status.model {
                details.insert("model".into(), json!(m));
            }
            if to.is_terminal()
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
            out.push((self.key(&written.id, &format!("@{version}/phase")), e));
        }
        out
    }
}

#[async_trait]
impl TaskStore for AuditedStore {
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    async fn admit(&self, task: NewTask) -> Result<Admission, StoreError> {
        self.ready().await?;
        let _order = self.stripe(&task.id).lock().await;
        let event = self.admission_event(&task);
        match self.inner.admit(task).await? {
            Admission::Created(mut t) => {
                t.status.audit_seq = self.record(vec![event]).await?;
                self.remember(&t);
                Ok(Admission::Created(t))
            }
            Admission::Existing(t) => {
                // Idempotent: a no-op when the admission is recorded, the repair when a crash lost it.
                self.record(vec![event]).await?;
                Ok(Admission::Existing(t))
            }
            other => Ok(other),
        }
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let t = self.inner.get_task(id).await?;
        if let Some(t) = &t {
            self.remember(t);
        }
        Ok(t)
    }

    async fn list_unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let tasks = self.inner.list_unfinished().await?;
        for t in &tasks {
            self.remember(t);
        }
        Ok(tasks)
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
        let _order = self.stripe(id).lock().await;
        let prior = self.prior(id, expected).await?;
        let mut written = self.inner.update_task_status(id, expected, status).await?;
        // A successful conditional write means the task was at `expected`, which `prior` read.
        let prior = prior.unwrap_or_else(|| Known {
            version: expected.clone(),
            phase: TaskPhase::Pending,
            approval: None,
            held: None,
            denied_steps: Vec::new(),
        });
        let events = self.status_events(&prior, &written);
        if let Some(seq) = self.record(events).await? {
            written.status.audit_seq = Some(seq);
        }
        self.remember(&written);
        Ok(written)
    }

    async fn request_cancel(&self, id: &str) -> Result<TaskRecord, StoreError> {
        self.ready().await?;
        let _order = self.stripe(id).lock().await;
        let mut t = self.inner.request_cancel(id).await?;
        let mut e = self.event(EventKind::Decision, id);
        e.from = Some(t.phase());
        e.reason = Some("cancel requested".into());
        e.details = json!({ "version": t.version.0 });
        if let Some(seq) = self
            .record(vec![(self.key(id, "/cancel-requested"), e)])
            .await?
        {
            t.status.audit_seq = Some(seq);
        }
        self.remember(&t);
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
        expected: &Version,
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
            self.record(vec![event]).await?;
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
    use crate::store::sqlite::{Db, SqliteStore};
    use agentplane_api::task::AgentTaskSpec;

    fn spec() -> AgentTaskSpec {
        crate::store::test_task("spec", AgentTaskStatus::default()).spec
    }

    fn sql(path: &std::path::Path, statement: &str) {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(statement)
            .unwrap();
    }

    fn to(t: &TaskRecord, phase: TaskPhase) -> AgentTaskStatus {
        AgentTaskStatus {
            phase: Some(phase),
            ..t.status.clone()
        }
    }

    #[tokio::test]
    async fn a_pipelined_store_finds_failed_appends_late_and_then_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let inner = SqliteStore::new(Db::open(&dir.path().join("db.sqlite")).unwrap(), "ns");
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
        let path = dir.path().join("audit.sqlite");
        let log = AuditLog::open(
            AuditLogConfig::new(&path, "agentplane.dev/audit/ns"),
            Arc::new(Ed25519Signer::from_seed([5; 32])),
        )
        .await
        .unwrap();
        let store = AuditedStore::pipelined(inner, log.clone());
        let Admission::Created(t) = store
            .admit(NewTask {
                id: "t1".into(),
                spec: spec(),
                seq: 1,
                trace_id: None,
            })
            .await
            .unwrap()
        else {
            panic!("not created")
        };
        assert_eq!(
            t.status.audit_seq, None,
            "pipelined writes do not wait for a seq"
        );
        store.settle().await;
        assert_eq!(log.size().await.unwrap(), 1);

        // Every leaf insert now aborts inside the log's database: the write still succeeds (its
        // events were queued), the failure is found by the confirmer ...
        sql(
            &path,
            "CREATE TRIGGER refuse BEFORE INSERT ON leaves BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        );
        let queued = store
            .update_task_status("t1", &t.version, to(&t, TaskPhase::Queued))
            .await
            .unwrap();
        store.settle().await;
        assert_eq!((store.append_failures(), store.pending()), (1, 1));
        // ... and no further write happens while its record is missing.
        let refused = store
            .update_task_status("t1", &queued.version, to(&queued, TaskPhase::Running))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("refusing writes"), "{refused}");
        assert_eq!(
            store.get_task("t1").await.unwrap().unwrap().version,
            queued.version
        );

        // The fault clears: the backlog goes first, then the new write, in order, without a gap.
        sql(&path, "DROP TRIGGER refuse;");
        store
            .update_task_status("t1", &queued.version, to(&queued, TaskPhase::Running))
            .await
            .unwrap();
        store.settle().await;
        assert_eq!(store.pending(), 0);
        let mut phases = Vec::new();
        for seq in 0..log.size().await.unwrap() {
            phases.push(log.leaf(seq).await.unwrap().unwrap().event().unwrap().to);
        }
        assert_eq!(
            phases,
            vec![
                Some(TaskPhase::Pending),
                Some(TaskPhase::Queued),
                Some(TaskPhase::Running)
            ]
        );
        log.close().await.unwrap();
    }
}
