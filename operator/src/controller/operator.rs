//! `agentplane operator`: the controller run as a kube-rs `Controller` over AgentTasks, under
//! Lease-based leader election so two replicas never both act.
//!
//! Each reconcile goes through kube's `finalizer` helper (tasks are born with the finalizer, see
//! `store::kubernetes::FINALIZER`; a task created around the gateway gets it on first sight) and then
//! runs the same [`super::reconcile`] step as the embedded runtime, against the Kubernetes store and
//! SQS. It also watches AgentApprovals, each waking the task it names. Notable decisions are also recorded as Kubernetes Events on the task.

use std::sync::Arc;
use std::time::Duration;

use agentplane_api::TaskPhase;
use agentplane_api::approval::AgentApproval;
use agentplane_api::task::{AgentTask, TRACEPARENT_ANNOTATION};
use futures::StreamExt as _;
use k8s_openapi::api::batch::v1::Job;
use kube::Client;
use kube::Resource as _;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube_lease_manager::LeaseManagerBuilder;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::gpu_job::{self, JOB_MESSAGE_PREFIX, JobOutcome, TASK_LABEL};
use super::{ControllerError, Outcome, finish, governs, reconcile_with, redispatch};
use crate::audit::{LogError, ObservedStore, TaskObserver};
use crate::metrics::Metrics;
use crate::policy::ledger::Ledger;
use crate::policy::rego::{KubeConfigMaps, RegoPolicies};
use crate::queue::DynQueue;
use crate::store::kubernetes::{FINALIZER, KubeStore, task_record};
use crate::store::{DynStore, StoreError, TaskStore};
use crate::telemetry;

#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Reconciles in flight at once (kube-rs bounds it per object as well: one at a time per task).
    pub concurrency: u16,
    /// Re-reconcile period for tasks waiting on something outside the watch (a held admission).
    pub requeue: Duration,
    /// The Lease the replicas compete for, and where it lives.
    pub lease_name: String,
    pub lease_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// Seconds a Lease stays valid without renewal, and how long before expiry the holder renews.
    pub lease_duration_secs: u64,
    pub lease_grace_secs: u64,
    /// Records every task state this replica observes while leading, and its own writes (see
    /// `audit::observer`). `None`: no audit log.
    pub audit: Option<Arc<TaskObserver>>,
    /// GPU tasks run as Jobs (the queue given to [`run`] is a `gpu_job::JobDispatchQueue`): watch
    /// those Jobs and fail a task whose Job failed or disappeared.
    pub gpu_jobs: bool,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            concurrency: 16,
            requeue: Duration::from_secs(30),
            lease_name: "agentplane-operator".into(),
            lease_namespace: "default".into(),
            identity: format!("agentplane-operator-{}", uuid::Uuid::new_v4().simple()),
            lease_duration_secs: 15,
            lease_grace_secs: 5,
            audit: None,
            gpu_jobs: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("leader election on Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
}

/// How often the operator reloads the policy's Rego modules on its own, so the `RegoCompiled`
/// condition follows an edit without waiting for a task.
const REGO_LOAD_PERIOD: Duration = Duration::from_secs(5);

/// What a reconcile needs.
struct Context {
    /// Rate-limit windows and budget spend, owned by the leader: rebuilt from every task when it
    /// starts leading, fed every task change while it leads. Admissions under a governing policy
    /// take it in turn; without rate limits or budgets nothing waits for it.
    ledger: tokio::sync::Mutex<Ledger>,
    store: Arc<KubeStore>,
    /// What reconciles write through: `store`, or `store` with every write recorded in the audit log.
    writes: DynStore,
    audit: Option<Arc<TaskObserver>>,
    queue: DynQueue,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    requeue: Duration,
    /// The namespace's Jobs, when GPU tasks run as Jobs.
    jobs: Option<Api<Job>>,
    /// The AgentPolicy's Rego modules, compiled once per version; each load is reported on the
    /// AgentPolicy's status.
    rego: Arc<RegoPolicies>,
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("recording in the audit log: {0}")]
    Audit(#[from] LogError),
}

/// Runs the operator until `shutdown`: waits for leadership, reconciles while leading, stops the
/// controller (letting in-flight reconciles finish) the moment leadership is lost, and releases the
/// Lease on the way out so a standby takes over without waiting for it to expire.
pub async fn run(
    client: Client,
    store: Arc<KubeStore>,
    queue: DynQueue,
    metrics: Arc<Metrics>,
    config: OperatorConfig,
    shutdown: CancellationToken,
) -> Result<(), OperatorError> {
    let lease_error = |source| OperatorError::Lease {
        namespace: config.lease_namespace.clone(),
        name: config.lease_name.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(&config.identity)
        .with_field_manager(format!("agentplane-operator/{}", config.identity))
        .with_duration(config.lease_duration_secs.max(2))
        .with_grace(
            config
                .lease_grace_secs
                .clamp(1, config.lease_duration_secs.max(2) - 1),
        )
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leader, lease_task) = manager.watch().await;
    let reporter = Reporter {
        controller: "agentplane-operator".into(),
        instance: Some(config.identity.clone()),
    };
    let writes: DynStore = match &config.audit {
        Some(observer) => ObservedStore::new(store.clone(), observer.clone()),
        None => store.clone(),
    };
    let jobs = config
        .gpu_jobs
        .then(|| Api::namespaced(client.clone(), store.namespace()));
    let rego = Arc::new(RegoPolicies::new(Some(Arc::new(KubeConfigMaps::new(
        client.clone(),
        store.namespace(),
    )))));
    let reporting = tokio::spawn(crate::policy::rego::report_to_policy(
        Api::namespaced(client.clone(), store.namespace()),
        crate::store::kubernetes::POLICY_NAME.to_owned(),
        rego.reports(),
    ));
    let loading = tokio::spawn(crate::policy::rego::keep_loaded(
        rego.clone(),
        store.clone(),
        REGO_LOAD_PERIOD,
    ));
    let ctx = Arc::new(Context {
        rego,
        jobs,
        ledger: tokio::sync::Mutex::new(Ledger::default()),
        store,
        writes,
        audit: config.audit.clone(),
        queue,
        metrics: metrics.clone(),
        recorder: Recorder::new(client, reporter),
        requeue: config.requeue,
    });

    'outer: loop {
        metrics.set_gauge("agentplane_operator_leader", &[], 0);
        // Wait to lead.
        while !*leader.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                changed = leader.changed() => if changed.is_err() {
                    tracing::error!("leader election stopped");
                    break 'outer;
                },
            }
        }
        tracing::info!(identity = %config.identity, lease = %config.lease_name, "leading: starting the controller");
        metrics.set_gauge("agentplane_operator_leader", &[], 1);
        let term = shutdown.child_token();
        let feed = tokio::spawn(load_ledger(ctx.clone(), term.clone()));
        let running = tokio::spawn(controller(ctx.clone(), config.concurrency, term.clone()));
        // The circuit breaker runs on the leader only: one writer of the trip.
        let breaker = tokio::spawn(
            super::breaker::BreakerWatch {
                store: ctx.writes.clone(),
                metrics: metrics.clone(),
                notifier: Some(Arc::new(super::breaker::KubeEventNotifier {
                    recorder: ctx.recorder.clone(),
                    namespace: ctx.store.namespace().to_owned(),
                })),
            }
            .run(term.clone()),
        );
        let mut lost = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = leader.changed() => {
                    if changed.is_err() || !*leader.borrow_and_update() {
                        lost = true;
                        break;
                    }
                }
            }
        }
        term.cancel();
        let _ = feed.await;
        let _ = breaker.await;
        if running.await.is_err() {
            tracing::error!("the controller task panicked");
        }
        if !lost {
            break;
        }
        tracing::warn!(identity = %config.identity, "lost the Lease: controller stopped, waiting to lead again");
    }
    reporting.abort();
    loading.abort();
    // Dropping the receiver makes the lease task release the Lease and return.
    drop(leader);
    match lease_task.await {
        Ok(Ok(_)) => tracing::info!("Lease released"),
        Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease failed; it will expire"),
        Err(e) => tracing::warn!(error = %e, "the lease task failed"),
    }
    Ok(())
}

/// Loads the ledger, holding its lock so no admission runs on a half-built one. From then on every
/// reconcile shows the ledger the task it saw (`apply`), which is every change the watch delivers.
async fn load_ledger(ctx: Arc<Context>, stop: CancellationToken) {
    let mut ledger = ctx.ledger.lock().await;
    let mut backoff = Duration::from_millis(200);
    loop {
        let loaded = async {
            let tasks = ctx.store.list_tasks().await?;
            let policy = ctx.store.get_policy().await?;
            Ok::<_, StoreError>(Ledger::rebuild(
                &tasks,
                policy.as_ref(),
                jiff::Timestamp::now(),
            ))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = loaded => match r {
                Ok(l) => {
                    *ledger = l;
                    tracing::info!(admitted = ledger.admitted_tasks(), "governance ledger loaded");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?backoff, "could not load the governance ledger");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
        }
    }
}

async fn controller(ctx: Arc<Context>, concurrency: u16, stop: CancellationToken) {
    let api = ctx.store.tasks_api().clone();
    let namespace = ctx.store.namespace().to_owned();
    // An approver's decision is its own object: its arrival wakes the task it names.
    let mut tasks = Controller::new(api, watcher::Config::default()).watches(
        ctx.store.approvals_api().clone(),
        watcher::Config::default(),
        move |a: AgentApproval| {
            Some(ObjectRef::<AgentTask>::new(&a.spec.task_ref.name).within(&namespace))
        },
    );
    if let Some(jobs) = &ctx.jobs {
        // A GPU Job's status change (failed, completed) wakes its owner task's reconcile.
        tasks = tasks.owns(jobs.clone(), watcher::Config::default().labels(TASK_LABEL));
    }
    tasks
        .with_config(controller::Config::default().concurrency(concurrency.max(1)))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_task, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile reported an error");
            }
        })
        .await;
    tracing::info!("controller stopped");
}

async fn reconcile_task(obj: Arc<AgentTask>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let api = ctx.store.tasks_api().clone();
    let started = std::time::Instant::now();
    let span = reconcile_span(&obj);
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            finalizer::Event::Apply(obj) => apply(&obj, &ctx).await,
            finalizer::Event::Cleanup(obj) => cleanup(&obj, &ctx).await,
        }
    })
    .instrument(span)
    .await;
    ctx.metrics.observe(
        "agentplane_reconcile_seconds",
        &[],
        started.elapsed().as_secs_f64(),
    );
    result.map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    })
}

/// The reconcile's span in the task's trace: a child of the `traceparent` annotation (the gateway's
/// hop), or of a stand-in parent when only `status.traceId` is known.
fn reconcile_span(obj: &AgentTask) -> tracing::Span {
    let span = tracing::info_span!(
        "operator.reconcile",
        task = %kube::ResourceExt::name_any(obj),
        phase = ?obj.status.as_ref().and_then(|s| s.phase),
    );
    let annotation = kube::ResourceExt::annotations(obj)
        .get(TRACEPARENT_ANNOTATION)
        .map(String::as_str);
    let trace_id = obj
        .status
        .as_ref()
        .and_then(|s| s.trace_id.clone())
        .or_else(|| annotation.and_then(telemetry::trace_id_in));
    if let Some(trace_id) = &trace_id {
        telemetry::join_trace(&span, trace_id, annotation);
    }
    span
}

async fn apply(obj: &AgentTask, ctx: &Context) -> Result<Action, ReconcileError> {
    let task = task_record(obj);
    // Recorded before acting: a log that cannot record stops decisions too (fails closed).
    if let Some(audit) = &ctx.audit {
        audit.observe(&task).await?;
    }
    let store: &dyn TaskStore = &*ctx.writes;
    let governed = task.phase() == TaskPhase::Pending
        && governs(
            store
                .get_policy()
                .await
                .map_err(ControllerError::from)?
                .as_ref(),
        );
    let result = if let Some(outcome) = check_gpu_job(&task, ctx, store).await? {
        Ok(outcome)
    } else if governed {
        let mut ledger = ctx.ledger.lock().await;
        let r = reconcile_with(store, &*ctx.queue, &task, Some(&mut ledger), &ctx.rego).await;
        r.map(|(outcome, decision)| {
            if let Some(d) = decision {
                ctx.metrics.inc(
                    "agentplane_admission_decisions_total",
                    &[("decision", d.decision), ("reason", &d.reason)],
                );
            }
            outcome
        })
    } else {
        reconcile_with(store, &*ctx.queue, &task, None, &ctx.rego)
            .await
            .map(|(outcome, _)| outcome)
    };
    match result {
        Ok(Outcome::Moved(phase)) => {
            ctx.metrics.inc(
                "agentplane_task_transitions_total",
                &[("phase", phase.as_str())],
            );
            if let Some(ev) = event_for(phase, &task.id) {
                // Events are informational: a failure to publish one must not fail the reconcile.
                if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
                    tracing::debug!(task = %task.id, error = %e, "could not publish an event");
                }
            }
            Ok(Action::await_change())
        }
        Ok(Outcome::Unchanged) if task.phase().is_terminal() => Ok(Action::await_change()),
        Ok(Outcome::RequeueAfter(after)) => Ok(Action::requeue(after)),
        // Waiting on something the watch does not show (a suspended policy, a held admission).
        Ok(Outcome::Unchanged) => Ok(Action::requeue(ctx.requeue)),
        // Someone wrote first; their write comes back through the watch and triggers us again.
        Err(ControllerError::Store(StoreError::Conflict { .. })) => {
            Ok(Action::requeue(Duration::from_millis(500)))
        }
        Err(e) => Err(e.into()),
    }
}

/// How often a GPU task handed back by its Job looks again at whether suspend was cleared.
const SUSPENDED_GPU_RECHECK: Duration = Duration::from_secs(5);

/// A GPU task out on its Job: fails the task when the Job failed (backoffLimit or deadline), or
/// was deleted or completed while the task was Running (the pod writes the result before it exits
/// 0). A Job that ended with the task handed back to Queued (suspended) is followed by a new Job
/// once the namespace is no longer suspended. `None`: not a GPU task on a Job, or its Job is still
/// going. Writes are conditional on the version read, so a pod that completes the task meanwhile
/// wins.
async fn check_gpu_job(
    task: &crate::store::TaskRecord,
    ctx: &Context,
    store: &dyn TaskStore,
) -> Result<Option<Outcome>, ReconcileError> {
    let Some(jobs) = &ctx.jobs else {
        return Ok(None);
    };
    // The Job of the task's latest dispatch (a plan approved at a step runs on a Job of its own).
    let Some(name) = task
        .status
        .queue
        .as_ref()
        .and_then(|q| q.message_id.as_deref())
        .and_then(|m| m.strip_prefix(JOB_MESSAGE_PREFIX))
    else {
        return Ok(None);
    };
    if !matches!(task.phase(), TaskPhase::Queued | TaskPhase::Running) {
        return Ok(None);
    }
    let outcome = gpu_job::job_outcome(jobs, name).await.map_err(|e| {
        ControllerError::from(StoreError::Backend(format!("reading Job {name}: {e}")))
    })?;
    // A Queued task whose Job ended (Complete) or is gone (its TTL ran out, or someone deleted it)
    // was handed back before it ran or before its plan's next step (the namespace was suspended):
    // it waits while suspended, then runs on a new Job named after the one that ended.
    let ended = match &outcome {
        JobOutcome::Complete { uid } => Some(uid.clone()),
        JobOutcome::Missing => Some(hex::encode(sha2::Sha256::digest(name.as_bytes()))),
        JobOutcome::Active | JobOutcome::Failed(_) => None,
    };
    if let Some(ended) = ended
        && task.phase() == TaskPhase::Queued
    {
        let suspended = store
            .get_policy()
            .await
            .map_err(ControllerError::from)?
            .is_some_and(|p| p.suspend);
        if suspended {
            tracing::debug!(task = %task.id, job = %name, "GPU task handed back by its Job; waiting while the namespace is suspended");
            // Clearing suspend changes the policy, not the task: look again soon rather than at
            // the next resync.
            return Ok(Some(Outcome::RequeueAfter(SUSPENDED_GPU_RECHECK)));
        }
        let made = jobs
            .list(&ListParams::default().labels(&format!("{TASK_LABEL}={}", task.id)))
            .await
            .map_err(|e| {
                ControllerError::from(StoreError::Backend(format!(
                    "listing the Jobs of task {}: {e}",
                    task.id
                )))
            })?
            .items
            .len();
        if made < gpu_job::MAX_JOBS_PER_TASK {
            let dedup_id = gpu_job::after_job_dispatch_id(&task.id, &ended);
            tracing::info!(task = %task.id, job = %name, next = %dedup_id, "GPU task handed back by its Job; running it on a new one");
            let outcome = redispatch(store, &*ctx.queue, task, dedup_id)
                .await
                .map_err(ReconcileError::from)?;
            return Ok(Some(outcome));
        }
        let reason = format!(
            "gpu_job_incomplete: Job {name} ended without finishing the task, and the task has had {made} Jobs already"
        );
        return Ok(Some(finish(store, task, TaskPhase::Failed, &reason).await?));
    }
    let reason = match outcome {
        JobOutcome::Active => return Ok(None),
        JobOutcome::Failed(why) => format!("gpu_job_failed: Job {name} failed: {why}"),
        JobOutcome::Missing => {
            format!("gpu_job_missing: Job {name} is gone but the task never finished")
        }
        JobOutcome::Complete { .. } => {
            format!("gpu_job_incomplete: Job {name} completed without finishing the task")
        }
    };
    Ok(Some(finish(store, task, TaskPhase::Failed, &reason).await?))
}

/// The task is being deleted: account for it, then let it go. A queued message for it is dropped by
/// the worker that receives it (the task is gone).
async fn cleanup(obj: &AgentTask, ctx: &Context) -> Result<Action, ReconcileError> {
    let task = task_record(obj);
    // The finalizer stays until the last state is recorded.
    if let Some(audit) = &ctx.audit {
        audit.observe(&task).await?;
    }
    let phase = task.phase();
    if !phase.is_terminal() {
        tracing::info!(task = %task.id, %phase, "task deleted before it finished");
        let ev = Event {
            type_: EventType::Warning,
            reason: "DeletedUnfinished".into(),
            note: Some(format!(
                "deleted while {phase}; its work item will be dropped"
            )),
            action: "Delete".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!(task = %task.id, error = %e, "could not publish an event");
        }
    }
    ctx.metrics.inc(
        "agentplane_tasks_deleted_total",
        &[("phase", phase.as_str())],
    );
    Ok(Action::await_change())
}

fn error_policy(_obj: Arc<AgentTask>, e: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// The Event recorded for a phase the controller moved a task to. Queued is the common path and
/// not worth an API write per task; the others are what an operator looks for.
fn event_for(phase: TaskPhase, task: &str) -> Option<Event> {
    let (type_, reason, note) = match phase {
        TaskPhase::Denied => (
            EventType::Warning,
            "Denied",
            "denied by policy or verification; see status.reason",
        ),
        TaskPhase::AwaitingApproval => (
            EventType::Normal,
            "AwaitingApproval",
            "waiting for an approver",
        ),
        TaskPhase::Cancelled => (
            EventType::Normal,
            "Cancelled",
            "cancelled at the device's request",
        ),
        TaskPhase::Failed => (EventType::Warning, "Failed", "failed; see status.reason"),
        _ => return None,
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(format!("task {task}: {note}")),
        action: "Reconcile".into(),
        secondary: None,
    })
}
