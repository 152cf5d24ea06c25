//! The controller: admits Pending tasks and routes decided approvals, generic over the store and queue.
//!
//! `reconcile` is one level-triggered step for one task (read state, decide, write at most one phase
//! change); `run` drives it from the store's change feed plus a periodic resync, the same shape as a
//! kube-rs `Controller` (watch + requeue), so the distributed operator can reuse `reconcile` as is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentplane_api::TaskPhase;
use agentplane_api::task::{AgentTaskStatus, ApprovalDecision, QueueStatus};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::policy::{self, Decision, TierChoice};
use crate::queue::{
    ATTR_TASK_ID, ATTR_TRACEPARENT, DynQueue, Outgoing, QueueError, QueueMessage, TaskQueue,
    TaskRef,
};
use crate::store::{DynStore, StoreError, TaskRecord, TaskStore, write_status};

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
}

/// One reconcile step for one task.
pub async fn reconcile(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
) -> Result<Outcome, ControllerError> {
    let phase = task.phase();
    if phase.is_terminal() {
        return Ok(Outcome::Unchanged);
    }
    if task.spec.cancel_requested() {
        // A Running task's worker sees the new phase when it re-reads, stops, and deletes its message.
        return finish(
            store,
            task,
            TaskPhase::Cancelled,
            "cancelled at the device's request",
        )
        .await;
    }
    match phase {
        TaskPhase::Pending => admit(store, queue, task).await,
        TaskPhase::AwaitingApproval => {
            let Some(approval) = &task.status.approval else {
                return Ok(Outcome::Unchanged);
            };
            match approval.decision {
                ApprovalDecision::Denied => {
                    let reason = format!("denied by approver {}", approval.approver);
                    finish(store, task, TaskPhase::Denied, &reason).await
                }
                ApprovalDecision::Approved => {
                    let tier = task.status.model.as_ref().and_then(|m| {
                        Some(TierChoice {
                            index: m.tier? as usize,
                            name: m.selected.clone()?,
                            requested: m.requested.clone(),
                        })
                    });
                    match tier {
                        Some(tier) => enqueue(store, queue, task, &tier).await,
                        None => {
                            finish(
                                store,
                                task,
                                TaskPhase::Failed,
                                "approved task has no model tier recorded",
                            )
                            .await
                        }
                    }
                }
            }
        }
        // Queued and Running belong to the workers.
        _ => Ok(Outcome::Unchanged),
    }
}

/// Pending: re-verify everything the gateway checked (a task may have been created around it), then
/// apply the policy.
async fn admit(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
) -> Result<Outcome, ControllerError> {
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
    match policy::evaluate(policy.as_ref(), &device.spec, &verified.payload) {
        Decision::Hold { .. } => Ok(Outcome::Unchanged),
        Decision::Deny { code, reason } => deny(store, task, code, &reason).await,
        Decision::AwaitApproval(tier) => {
            let status = AgentTaskStatus {
                phase: Some(TaskPhase::AwaitingApproval),
                model: Some(tier.selection()),
                ..task.status.clone()
            };
            write_status(store, task, status).await?;
            Ok(Outcome::Moved(TaskPhase::AwaitingApproval))
        }
        Decision::Admit(tier) => enqueue(store, queue, task, &tier).await,
    }
}

/// Sends the work item, then records Queued. In that order: a crash in between leaves a Pending task
/// whose next reconcile sends again, and the task-id deduplication id makes that second send a no-op.
async fn enqueue(
    store: &dyn TaskStore,
    queue: &dyn TaskQueue,
    task: &TaskRecord,
    tier: &TierChoice,
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
    let mut attributes = BTreeMap::from([(ATTR_TASK_ID.to_owned(), task.id.clone())]);
    if let Some(trace_id) = &task.status.trace_id {
        attributes.insert(ATTR_TRACEPARENT.to_owned(), traceparent(trace_id));
    }
    let message_id = queue
        .send(Outgoing {
            body: serde_json::to_string(&body).map_err(QueueError::backend)?,
            attributes,
            group_id: Some(task.spec.device_ref.name.clone()),
            dedup_id: Some(task.id.clone()),
        })
        .await?;
    let status = AgentTaskStatus {
        phase: Some(TaskPhase::Queued),
        model: Some(tier.selection()),
        queue: Some(QueueStatus {
            message_id: Some(message_id),
            receive_count: 0,
        }),
        ..task.status.clone()
    };
    write_status(store, task, status).await?;
    Ok(Outcome::Moved(TaskPhase::Queued))
}

/// A child span context under the task's trace: the controller's hop of the W3C trace.
fn traceparent(trace_id: &str) -> String {
    let span = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace_id}-{}-01", &span[..16])
}

async fn deny(
    store: &dyn TaskStore,
    task: &TaskRecord,
    code: &str,
    reason: &str,
) -> Result<Outcome, ControllerError> {
    finish(store, task, TaskPhase::Denied, &format!("{code}: {reason}")).await
}

async fn finish(
    store: &dyn TaskStore,
    task: &TaskRecord,
    phase: TaskPhase,
    reason: &str,
) -> Result<Outcome, ControllerError> {
    let status = AgentTaskStatus {
        phase: Some(phase),
        reason: Some(reason.to_owned()),
        ..task.status.clone()
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

impl Controller {
    /// Runs until `shutdown`. Reconciles one task at a time: the work per task is a few store calls,
    /// and one writer keeps the controller's own writes from conflicting with each other.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.store.changes();
        // A zero period would make `interval` panic.
        let mut resync = tokio::time::interval(self.resync.max(Duration::from_millis(10)));
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = resync.tick() => self.resync_all().await,
                ev = changes.recv() => match ev {
                    Ok(ev) if interesting(ev.phase, ev.cancel_requested) => self.reconcile_one(&ev.task).await,
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "controller fell behind the change feed; resyncing");
                        self.resync_all().await;
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
        tracing::info!("controller stopped");
    }

    async fn resync_all(&self) {
        match self.store.list_unfinished().await {
            Ok(tasks) => {
                for t in tasks
                    .iter()
                    .filter(|t| interesting(t.phase(), t.spec.cancel_requested()))
                {
                    self.reconcile_one(t).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "controller resync failed"),
        }
    }

    async fn reconcile_one(&self, task: &TaskRecord) {
        match reconcile(&*self.store, &*self.queue, task).await {
            Ok(Outcome::Moved(phase)) => {
                self.metrics.inc(
                    "agentplane_task_transitions_total",
                    &[("phase", phase.as_str())],
                );
            }
            Ok(Outcome::Unchanged) => {}
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
