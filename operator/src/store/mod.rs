//! The task store: tasks, approvers' decisions, devices, the namespace's policy and enrollment join
//! tokens.
//!
//! Two implementations share this trait: the embedded SQLite store (`sqlite`) used by `agentplane dev`,
//! and the Kubernetes API (`kubernetes`), where a record is a custom resource. The trait is shaped so that
//! mapping stays direct:
//! - [`Version`] is an opaque token, the resourceVersion in Kubernetes; every write that depends on
//!   what was read is conditional on it, which is what makes a worker's completion write exactly-once.
//! - Status writes go through [`TaskStore::update_task_status`] (the status subresource), spec changes
//!   only through [`TaskStore::request_cancel`] (the one mutable spec field).
//! - [`TaskStore::changes`] is the watch: a best-effort wake-up signal, never the source of truth.

pub mod journal;
pub mod kube_journal;
pub mod kubernetes;
pub mod seq_window;
pub mod sqlite;

use std::sync::Arc;

use agentplane_api::TaskPhase;
use agentplane_api::device::{EdgeDeviceSpec, EdgeDeviceStatus};
use agentplane_api::policy::{AgentPolicySpec, AgentPolicyStatus, BreakerTrip};
use agentplane_api::task::{AgentTaskSpec, AgentTaskStatus, Approval};
use async_trait::async_trait;
use jiff::Timestamp;
use tokio::sync::broadcast;

/// Opaque version of a stored record (a Kubernetes resourceVersion in the distributed backend).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One AgentTask as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    /// The task id, which is also the object name.
    pub id: String,
    pub spec: AgentTaskSpec,
    pub status: AgentTaskStatus,
    /// When the store accepted the task (metadata.creationTimestamp): keys are checked as of this instant.
    pub created_at: Timestamp,
    pub version: Version,
}

impl TaskRecord {
    pub fn phase(&self) -> TaskPhase {
        self.status.phase()
    }
}

/// One EdgeDevice as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRecord {
    pub name: String,
    pub spec: EdgeDeviceSpec,
    pub status: EdgeDeviceStatus,
    pub version: Version,
}

/// One approver's decision as recorded (an `AgentApproval`), not yet judged: the controller accepts
/// it into the task's `status.approval` only after re-checking it.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionRecord {
    /// The record's name (the AgentApproval's object name in Kubernetes).
    pub name: String,
    pub task_id: String,
    pub approval: Approval,
}

/// A task the gateway wants to admit.
#[derive(Clone, Debug)]
pub struct NewTask {
    pub id: String,
    pub spec: AgentTaskSpec,
    /// The signed per-device sequence number.
    pub seq: u64,
    pub trace_id: Option<String>,
}

/// What admitting a task did.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// A new task was stored and its seq recorded in the device's window (lastSeq moved up to it if
    /// it was higher).
    Created(TaskRecord),
    /// A task with this id already exists; nothing was written.
    Existing(TaskRecord),
    /// The task id is new but its seq is already taken by another task of the device, or is too far
    /// below the device's lastSeq ([`seq_window`]): a replay. Nothing was written.
    SeqReplay(seq_window::SeqRefusal),
}

/// A device to register with a one-time join token.
#[derive(Clone, Debug)]
pub struct Enrollment {
    pub token_hash: String,
    pub device_id: String,
    pub spec: EdgeDeviceSpec,
}

/// What enrolling did.
#[derive(Clone, Debug, PartialEq)]
pub enum EnrollOutcome {
    Created(DeviceRecord),
    /// The same device enrolled again with the same key: nothing changed.
    AlreadyEnrolled(DeviceRecord),
    /// The token is unknown, expired, or was spent by another device.
    InvalidToken,
    /// The device name is taken by a device with different keys.
    NameTaken,
}

/// A change to a task, published after the write commits. Receivers may lag and miss some: they
/// then re-read (a lagged receiver gets `RecvError::Lagged` and must resync).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskChanged {
    pub id: String,
    pub phase: TaskPhase,
    pub cancel_requested: bool,
    /// The task as written. Events arrive in commit order per task, so the newest event carries the
    /// newest state; consumers may act on it without re-reading (their writes stay conditional).
    pub task: Arc<TaskRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record changed since it was read (resourceVersion mismatch). Re-read and decide again.
    #[error("{kind} {id} changed since it was read (expected version {expected})")]
    Conflict {
        kind: &'static str,
        id: String,
        expected: String,
    },
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A status write that the phase machine refuses; nothing was written.
    #[error("task {id}: phase {from} cannot move to {to}")]
    IllegalTransition {
        id: String,
        from: TaskPhase,
        to: TaskPhase,
    },
    /// The backend failed (I/O, corruption, the API server): a server fault, retried by callers.
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    pub fn backend(e: impl std::fmt::Display) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Tasks, devices, policy and join tokens of one namespace.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// The namespace this store serves.
    fn namespace(&self) -> &str;

    /// Admits a task under the per-device replay rule ([`seq_window`]), atomically with recording its
    /// seq in the device's window. Implementations that cannot do both in one transaction (Kubernetes)
    /// must create the task first and then record the seq conditionally, withdrawing the task if that
    /// loses: a crash in between leaves a task whose resubmission is answered as `Existing`, never a
    /// burnt seq.
    async fn admit(&self, task: NewTask) -> Result<Admission, StoreError>;

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// Tasks not in a terminal phase, for resyncs.
    async fn list_unfinished(&self) -> Result<Vec<TaskRecord>, StoreError>;

    /// Every task of the namespace in any phase, oldest first: the governance ledger (rate-limit
    /// windows, budget spend) is rebuilt from it when the controller starts, so a restart does not
    /// reset a limit.
    async fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;

    /// Writes a task's status if its version is still `expected`. The phase change must be an edge of
    /// the phase machine ([`TaskPhase::can_move_to`]); implementations check it again inside the write.
    async fn update_task_status(
        &self,
        id: &str,
        expected: &Version,
        status: AgentTaskStatus,
    ) -> Result<TaskRecord, StoreError>;

    /// Sets `spec.cancel = true` (idempotent).
    async fn request_cancel(&self, id: &str) -> Result<TaskRecord, StoreError>;

    /// Records an approver's decision about task `task_id` as its own record, apart from the task
    /// (so writing one never needs write access to task status), and wakes the task's watchers.
    /// Nothing is judged here: the controller re-checks it before it counts.
    async fn record_decision(
        &self,
        task_id: &str,
        approval: Approval,
    ) -> Result<DecisionRecord, StoreError>;

    /// Every decision recorded about task `task_id`, oldest first.
    async fn decisions(&self, task_id: &str) -> Result<Vec<DecisionRecord>, StoreError>;

    async fn get_device(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError>;

    /// Creates or replaces a device's spec (administration: rotation, revocation, tests).
    async fn put_device(
        &self,
        name: &str,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError>;

    /// Replaces a device's spec if its version is still `expected` (key rotation: a concurrent
    /// revocation must not be overwritten).
    async fn update_device_spec(
        &self,
        name: &str,
        expected: &Version,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError>;

    /// Spends a join token on a device, atomically.
    async fn enroll(&self, enrollment: Enrollment) -> Result<EnrollOutcome, StoreError>;

    /// Stores a join token (only its hash), valid until `expires_at`. Idempotent for an unspent token.
    async fn add_join_token(
        &self,
        token_hash: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError>;

    /// The namespace's AgentPolicy (`default`), if any.
    async fn get_policy(&self) -> Result<Option<AgentPolicySpec>, StoreError>;

    async fn put_policy(&self, spec: AgentPolicySpec) -> Result<(), StoreError>;

    /// The circuit breaker's trip: sets `spec.suspend` and records `status.lastTrip` on the
    /// namespace's policy. Returns `false`, writing nothing, when there is no policy or it is
    /// already suspended (a trip never overwrites the record of the one that suspended it).
    async fn trip_breaker(&self, trip: BreakerTrip) -> Result<bool, StoreError>;

    /// The namespace's AgentPolicy status (`lastTrip`), if there is a policy.
    async fn policy_status(&self) -> Result<Option<AgentPolicyStatus>, StoreError>;

    /// Subscribes to task changes.
    fn changes(&self) -> broadcast::Receiver<TaskChanged>;
}

pub type DynStore = Arc<dyn TaskStore>;

/// A task for unit tests: a placeholder envelope (nothing verifies it), `phase` and `status` as given.
#[cfg(test)]
pub(crate) fn test_task(id: &str, status: AgentTaskStatus) -> TaskRecord {
    use agentplane_api::intent::{PrivacyLevel, RequiredResources};
    use agentplane_api::task::DeviceRef;
    use agentplane_api::{Envelope, EnvelopeSignature};
    TaskRecord {
        id: id.into(),
        spec: AgentTaskSpec {
            device_ref: DeviceRef {
                name: "kiosk".into(),
            },
            envelope: Envelope {
                payload_type: "t".into(),
                payload: "e30=".into(),
                signatures: vec![EnvelopeSignature {
                    keyid: String::new(),
                    sig: String::new(),
                }],
            },
            user_id: "alice".into(),
            intent_type: "summarize".into(),
            privacy_level: PrivacyLevel::Public,
            required_resources: RequiredResources::default(),
            cancel: None,
        },
        status,
        created_at: Timestamp::UNIX_EPOCH,
        version: Version("1".into()),
    }
}

/// Writes a status after checking the phase machine, so an illegal move is refused before any I/O.
pub async fn write_status(
    store: &dyn TaskStore,
    task: &TaskRecord,
    status: AgentTaskStatus,
) -> Result<TaskRecord, StoreError> {
    let (from, to) = (task.phase(), status.phase());
    if !from.can_move_to(to) {
        return Err(StoreError::IllegalTransition {
            id: task.id.clone(),
            from,
            to,
        });
    }
    let mut status = status;
    stamp_conditions(&task.status, &mut status, Timestamp::now());
    store
        .update_task_status(&task.id, &task.version, status)
        .await
}

/// Condition types on an AgentTask's status, the Kubernetes way of saying what happened and when:
/// - `Admitted`: True once the controller queued the task or parked it for approval, False when it
///   denied it (reason `Denied`, the denial in the message);
/// - `Approved`: an approver's decision, with the approver in the message;
/// - `Running`: True from the moment a worker took the task;
/// - `Completed`: True in a terminal phase, the phase as reason.
pub const CONDITION_ADMITTED: &str = "Admitted";
pub const CONDITION_APPROVED: &str = "Approved";
pub const CONDITION_RUNNING: &str = "Running";
pub const CONDITION_COMPLETED: &str = "Completed";

/// Longest condition message kept (the API's limit is 32 KiB).
const MAX_CONDITION_MESSAGE: usize = 4096;

/// Brings `new.conditions` in line with the move from `old` to `new`.
pub fn stamp_conditions(old: &AgentTaskStatus, new: &mut AgentTaskStatus, now: Timestamp) {
    let (from, to) = (old.phase(), new.phase());
    let reason_text = new.reason.clone().unwrap_or_default();
    if from != to {
        match to {
            // The controller stamps its own admission (with the governance reason); fill in only
            // when a writer did not.
            TaskPhase::Queued | TaskPhase::AwaitingApproval
                if from == TaskPhase::Pending && admitted_at(new).is_none() =>
            {
                set_condition(
                    new,
                    CONDITION_ADMITTED,
                    true,
                    "WithinPolicy",
                    "admitted by policy",
                    now,
                )
            }
            TaskPhase::Denied => {
                set_condition(new, CONDITION_ADMITTED, false, "Denied", &reason_text, now)
            }
            TaskPhase::Running => set_condition(
                new,
                CONDITION_RUNNING,
                true,
                "Running",
                "taken by a worker",
                now,
            ),
            _ => {}
        }
        if to.is_terminal() {
            set_condition(
                new,
                CONDITION_COMPLETED,
                true,
                to.as_str(),
                &reason_text,
                now,
            );
            if from == TaskPhase::Running {
                set_condition(new, CONDITION_RUNNING, false, to.as_str(), "", now);
            }
        }
    }
    if new.approval != old.approval
        && let Some(a) = new.approval.clone()
    {
        let approved = a.decision == agentplane_api::task::ApprovalDecision::Approved;
        let message = format!("by {}", a.approver);
        set_condition(
            new,
            CONDITION_APPROVED,
            approved,
            if approved { "Approved" } else { "Denied" },
            &message,
            now,
        );
    }
}

/// Upserts one condition; its transition time moves only when its status flips.
fn set_condition(
    status: &mut AgentTaskStatus,
    kind: &str,
    value: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    let value = if value { "True" } else { "False" };
    let mut message = message.to_owned();
    if message.len() > MAX_CONDITION_MESSAGE {
        let mut cut = MAX_CONDITION_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    match status.conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = Time(now);
            }
            c.status = value.to_owned();
            c.reason = reason.to_owned();
            c.message = message;
        }
        None => status.conditions.push(Condition {
            type_: kind.to_owned(),
            status: value.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: Time(now),
            observed_generation: None,
        }),
    }
}

/// When the task was admitted (its `Admitted` condition turned True), if it was.
pub fn admitted_at(status: &AgentTaskStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_ADMITTED && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// A second enrollment under an existing device name: harmless when it is the same device (every key it
/// presents is registered) and the device is not revoked; otherwise the name is taken.
pub fn reenrollment(existing: &DeviceRecord, spec: &EdgeDeviceSpec) -> EnrollOutcome {
    let same_keys = spec.public_keys.iter().all(|k| {
        existing
            .spec
            .public_keys
            .iter()
            .any(|x| x.id == k.id && x.key == k.key)
    });
    if same_keys && !existing.spec.revoked {
        EnrollOutcome::AlreadyEnrolled(existing.clone())
    } else {
        EnrollOutcome::NameTaken
    }
}

/// SHA-256 of a secret (join tokens, approver tokens), hex: only hashes are stored or compared.
pub fn hash_secret(secret: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}
