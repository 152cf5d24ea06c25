//! The worker: takes work items off the queue and runs them, generic over store, queue and models.
//!
//! Per message: re-read the task (gone, terminal or cancelled -> delete the message), move it to
//! Running, call the model while a heartbeat keeps the message hidden and re-reads the task, then write
//! the result with a write conditional on the version read at Running. A redelivered message for a
//! finished task therefore never runs it again, and two workers can never both complete it. Failures
//! go back to the queue; the queue's redrive moves a message that failed too often to the dead-letter
//! queue, whose reaper marks the task Failed with the last error.

pub mod one_task;
pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use agentplane_api::TaskPhase;
use agentplane_api::task::{AgentTaskStatus, QueueStatus, Usage};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::metrics::Metrics;
use crate::models::{ModelCall, ModelClient, ModelError, idempotency_key};
use crate::queue::{ATTR_TRACEPARENT, Delivery, DynQueue, LeaseId, QueueError, QueueMessage};
use crate::store::{DynStore, StoreError, TaskRecord, write_status};
use crate::telemetry;

/// How often the queue depth gauge is refreshed.
const QUEUE_DEPTH_SAMPLE: Duration = Duration::from_secs(5);

/// Most messages one receive asks for (SQS's ReceiveMessage limit).
pub const MAX_RECEIVE_BATCH: usize = 10;

/// Longest a worker waits for the controller to record Queued after seeing its message.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Concurrent consumers (each handles one message at a time).
    pub concurrency: usize,
    /// How long a received message stays hidden; heartbeats extend it every third of this.
    pub visibility: Duration,
    /// Long-poll wait per receive.
    pub wait: Duration,
    /// First redelivery delay after a failed attempt; grows linearly with the receive count.
    pub retry_delay: Duration,
    /// Longest a single model call may take.
    pub call_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 4,
            visibility: Duration::from_secs(30),
            wait: Duration::from_secs(2),
            retry_delay: Duration::from_millis(500),
            call_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

pub struct Worker {
    pub store: DynStore,
    pub queue: DynQueue,
    pub dead_letters: DynQueue,
    pub models: Arc<dyn ModelClient>,
    pub metrics: Arc<Metrics>,
    pub config: WorkerConfig,
    /// What multi-step plans need (step journal, MCP secrets, the tool gate's rate-limit log).
    pub plans: plan::PlanSupport,
}

/// How one attempt ended (for logs and tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    Succeeded,
    /// Nothing to run (gone, terminal, cancelled); the message was deleted.
    Dropped,
    /// Not ours to run yet or any more; the message was left to the queue.
    Released,
    /// The attempt failed and will be retried by redelivery.
    Retry,
    /// The task failed for good; the message was deleted.
    Failed,
    /// A plan waits at a step for an approver (AwaitingApproval); the message was deleted and the
    /// controller sends a new one once the step is decided.
    Parked,
    /// The namespace is suspended: the task stays (or went back to) Queued and the message was
    /// handed back to the queue.
    Suspended,
}

impl Worker {
    /// Runs the consumers and the dead-letter reaper until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        let w = self.clone();
        let s = shutdown.clone();
        tasks.spawn(async move { w.consume(s).await });
        let w = self.clone();
        let s = shutdown.clone();
        tasks.spawn(async move { w.reap_dead_letters(s).await });
        let w = self.clone();
        let s = shutdown.clone();
        tasks.spawn(async move { w.sample_queue_depth(s).await });
        while tasks.join_next().await.is_some() {}
        tracing::info!("worker stopped");
    }

    /// One receive loop feeding up to `concurrency` handlers: each receive asks for as many messages
    /// as there are free slots (at most [`MAX_RECEIVE_BATCH`], SQS's limit), so nothing received
    /// waits for a slot while its visibility timeout runs. On shutdown, no new message is taken and
    /// the handlers in flight finish (their model calls are bounded by `call_timeout`).
    async fn consume(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.config.concurrency.max(1)));
        let mut running = tokio::task::JoinSet::new();
        while !shutdown.is_cancelled() {
            while running.try_join_next().is_some() {}
            // The kill switch: while the policy is suspended, nothing new is taken off the queue.
            match self.store.get_policy().await {
                Ok(Some(p)) if p.suspend => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(self.config.wait.min(Duration::from_secs(1))) => continue,
                    }
                }
                _ => {}
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut permits = vec![first];
            while permits.len() < MAX_RECEIVE_BATCH {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.queue.receive(permits.len(), self.config.visibility, self.config.wait) => r,
            };
            match received {
                Ok(deliveries) => {
                    for d in deliveries {
                        let Some(permit) = permits.pop() else {
                            // A queue answering more than asked: leave the extra to its timeout.
                            tracing::warn!(message = %d.message_id, "received more messages than asked for");
                            continue;
                        };
                        let w = self.clone();
                        running.spawn(async move {
                            match w.handle(&d).await {
                                Ok(outcome) => {
                                    tracing::debug!(message = %d.message_id, ?outcome, "handled")
                                }
                                // Leave the message to its visibility timeout: redelivery retries it.
                                Err(e) => {
                                    tracing::error!(message = %d.message_id, error = %e, "handling failed")
                                }
                            }
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "receive failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(self.config.retry_delay) => {}
                    }
                }
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// Handles one delivery, in a span that is a child of the message's `traceparent` (the
    /// controller's hop of the task's trace).
    pub async fn handle(&self, d: &Delivery) -> Result<Handled, WorkerError> {
        let span = tracing::info_span!(
            "worker.handle",
            otel.kind = "consumer",
            message = %d.message_id,
            receive_count = d.receive_count,
        );
        if let Some(tp) = d.attributes.get(ATTR_TRACEPARENT) {
            telemetry::set_remote_parent(&span, tp);
        }
        self.handle_delivery(d).instrument(span).await
    }

    async fn handle_delivery(&self, d: &Delivery) -> Result<Handled, WorkerError> {
        let msg: QueueMessage = match serde_json::from_str(&d.body) {
            Ok(m) => m,
            Err(e) => {
                // A poison message: let redelivery carry it to the dead-letter queue.
                tracing::error!(message = %d.message_id, error = %e, "unreadable queue message");
                self.queue
                    .release(&d.lease, self.config.retry_delay)
                    .await?;
                return Ok(Handled::Retry);
            }
        };
        let Some(task) = self.settled_task(&msg.task.name).await? else {
            self.queue.delete(&d.lease).await?;
            return Ok(Handled::Dropped);
        };
        if task.phase().is_terminal() {
            self.queue.delete(&d.lease).await?;
            return Ok(Handled::Dropped);
        }
        if task.spec.cancel_requested() {
            self.cancel(&task).await?;
            self.queue.delete(&d.lease).await?;
            return Ok(Handled::Dropped);
        }
        // Suspended while this receive was waiting: hand the message back untouched.
        if self.store.get_policy().await?.is_some_and(|p| p.suspend) {
            self.queue.release(&d.lease, self.config.wait).await?;
            return Ok(Handled::Suspended);
        }
        if !matches!(task.phase(), TaskPhase::Queued | TaskPhase::Running) {
            // Sent, but the controller has not recorded Queued yet: come back shortly.
            self.queue
                .release(&d.lease, self.config.retry_delay)
                .await?;
            return Ok(Handled::Released);
        }
        let running = match write_status(
            &*self.store,
            &task,
            AgentTaskStatus {
                phase: Some(TaskPhase::Running),
                queue: Some(QueueStatus {
                    message_id: Some(d.message_id.clone()),
                    receive_count: d.receive_count,
                }),
                ..task.status.clone()
            },
        )
        .await
        {
            Ok(t) => t,
            Err(StoreError::Conflict { .. }) => {
                self.queue.release(&d.lease, Duration::ZERO).await?;
                return Ok(Handled::Released);
            }
            Err(e) => return Err(e.into()),
        };
        self.metrics
            .inc("agentplane_task_transitions_total", &[("phase", "Running")]);
        if let Some(admitted) = crate::store::admitted_at(&running.status) {
            let lag = jiff::Timestamp::now().duration_since(admitted);
            self.metrics.observe(
                "agentplane_queue_lag_seconds",
                &[],
                lag.as_secs_f64().max(0.0),
            );
        }
        self.run_task(d, &msg, running).await
    }

    /// Reads the task, waiting briefly while it is still Pending or AwaitingApproval: the controller
    /// sends the message before it records Queued, so a fast worker can see the message first.
    /// Waiting here beats handing the message back, which would cost a redelivery and a receive.
    async fn settled_task(&self, id: &str) -> Result<Option<TaskRecord>, WorkerError> {
        let mut changes = self.store.changes();
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        let Some(mut task) = self.store.get_task(id).await? else {
            return Ok(None);
        };
        loop {
            if !matches!(
                task.phase(),
                TaskPhase::Pending | TaskPhase::AwaitingApproval
            ) {
                return Ok(Some(task));
            }
            let changed = async {
                loop {
                    match changes.recv().await {
                        Ok(ev) if ev.id == id => return Some(TaskRecord::clone(&ev.task)),
                        Ok(_) => {}
                        // Missed events or no feed: re-read.
                        Err(_) => return None,
                    }
                }
            };
            match tokio::time::timeout_at(deadline, changed).await {
                Err(_elapsed) => return Ok(Some(task)),
                Ok(Some(t)) => task = t,
                Ok(None) => match self.store.get_task(id).await? {
                    Some(t) => task = t,
                    None => return Ok(None),
                },
            }
        }
    }

    async fn run_task(
        &self,
        d: &Delivery,
        msg: &QueueMessage,
        running: TaskRecord,
    ) -> Result<Handled, WorkerError> {
        let policy = self.store.get_policy().await?;
        let tier_name = running
            .status
            .model
            .as_ref()
            .and_then(|m| m.selected.clone())
            .unwrap_or_else(|| msg.tier.clone());
        let Some(tier) = policy
            .as_ref()
            .and_then(|p| p.tier(&tier_name))
            .map(|(_, t)| t.clone())
        else {
            let reason = format!("model tier {tier_name:?} is not in the policy any more");
            return self.fail(d, &running, &reason).await;
        };
        // Verified by the controller before the task was queued; read again only for the prompt.
        let payload = match running.spec.envelope.peek_intent() {
            Ok(p) => p,
            Err(e) => {
                return self
                    .fail(d, &running, &format!("envelope unreadable: {e}"))
                    .await;
            }
        };

        // An intent whose rule allows tools runs as a plan; any other is one model call, as before.
        if let Some(policy) = policy.filter(|p| plan::has_tools(p, &running.spec.intent_type)) {
            let prompt = plan::Prompt {
                text: payload.intent.prompt,
                params: payload.intent.params,
            };
            return self.run_plan(d, running, tier, policy, prompt).await;
        }

        let stop = CancellationToken::new();
        let heartbeat = self.start_heartbeat(d, &running.id, &stop);
        // Step 1 is the task's one model call; every attempt at it carries the same key.
        let step_key = idempotency_key(&running.id, 1);
        // The model call's own span; the endpoint gets its context as `traceparent`.
        let call_span =
            tracing::info_span!("worker.model_call", otel.kind = "client", tier = %tier.name);
        let traceparent = d
            .attributes
            .get(ATTR_TRACEPARENT)
            .and_then(|tp| telemetry::trace_id_in(tp))
            .or_else(|| running.status.trace_id.clone())
            .and_then(|trace_id| telemetry::hop_traceparent(&call_span, &trace_id));
        let model_call = ModelCall {
            tier: &tier,
            prompt: &payload.intent.prompt,
            params: &payload.intent.params,
            idempotency_key: &step_key,
            traceparent: traceparent.as_deref(),
        };
        let call =
            tokio::time::timeout(self.config.call_timeout, self.models.complete(&model_call))
                .instrument(call_span);
        let call_started = std::time::Instant::now();
        let result = tokio::select! {
            r = call => Some(r),
            _ = stop.cancelled() => None,
        };
        if result.is_some() {
            self.metrics.observe(
                "agentplane_model_call_seconds",
                &[("tier", &tier.name)],
                call_started.elapsed().as_secs_f64(),
            );
        }
        heartbeat.abort();

        let completion = match result {
            None => {
                // Cancelled, finished elsewhere, or we lost the lease: re-read and settle.
                return self.settle_after_stop(d, &running.id).await;
            }
            Some(Err(_elapsed)) => {
                let reason = format!("model call timed out after {:?}", self.config.call_timeout);
                return self.retry(d, &running, &reason).await;
            }
            Some(Ok(Err(ModelError::Unsupported(e)))) => {
                return self
                    .fail(d, &running, &format!("unsupported model endpoint: {e}"))
                    .await;
            }
            Some(Ok(Err(e @ ModelError::Rejected(_)))) => {
                self.metrics.inc(
                    "agentplane_model_calls_total",
                    &[("tier", &tier.name), ("outcome", "rejected")],
                );
                return self.fail(d, &running, &e.to_string()).await;
            }
            Some(Ok(Err(e @ ModelError::Failed(_)))) => {
                self.metrics.inc(
                    "agentplane_model_calls_total",
                    &[("tier", &tier.name), ("outcome", "error")],
                );
                return self.retry(d, &running, &e.to_string()).await;
            }
            Some(Ok(Ok(c))) => c,
        };
        let usage = Usage {
            input_tokens: completion.input_tokens,
            output_tokens: completion.output_tokens,
            cost_micros: tier.cost_micros(completion.input_tokens, completion.output_tokens),
        };
        self.count_model_call(&tier, &usage);
        self.succeed(d, &running, completion.text, usage, Vec::new())
            .await
    }

    /// Counts one successful model call (a task's call, or one turn of a plan) in the metrics.
    fn count_model_call(&self, tier: &agentplane_api::policy::ModelTier, usage: &Usage) {
        self.metrics.inc(
            "agentplane_model_calls_total",
            &[("tier", &tier.name), ("outcome", "ok")],
        );
        let namespace = self.store.namespace().to_owned();
        let model = tier.model.clone().unwrap_or_else(|| tier.name.clone());
        let by = |direction: &'static str| {
            [
                ("tier", tier.name.clone()),
                ("model", model.clone()),
                ("namespace", namespace.clone()),
                ("direction", direction.to_owned()),
            ]
        };
        for (direction, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            let labels = by(direction);
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.metrics
                .add("agentplane_model_tokens_total", &labels, n);
        }
        self.metrics.add(
            "agentplane_cost_micros_total",
            &[
                ("tier", &tier.name),
                ("model", &model),
                ("namespace", &namespace),
            ],
            usage.cost_micros,
        );
    }

    /// Writes the result (conditional on the version read at Running) and deletes the message.
    async fn succeed(
        &self,
        d: &Delivery,
        running: &TaskRecord,
        result: String,
        usage: Usage,
        steps: Vec<agentplane_api::task::PlanStep>,
    ) -> Result<Handled, WorkerError> {
        let done = AgentTaskStatus {
            phase: Some(TaskPhase::Succeeded),
            usage: Some(usage),
            result: Some(result),
            reason: None,
            steps: if steps.is_empty() {
                running.status.steps.clone()
            } else {
                steps
            },
            pending_approval: None,
            ..running.status.clone()
        };
        match write_status(&*self.store, running, done).await {
            Ok(_) => {
                self.metrics.inc(
                    "agentplane_task_transitions_total",
                    &[("phase", "Succeeded")],
                );
                self.delete_quietly(&d.lease).await;
                Ok(Handled::Succeeded)
            }
            // Someone wrote since Running (cancel, another worker after our lease ran out): our result
            // is not the task's result. Settle from what the store says now.
            Err(StoreError::Conflict { .. }) => self.settle_after_stop(d, &running.id).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Starts the heartbeat that keeps `d` hidden while the task runs and cancels `stop` when the
    /// task is cancelled or finished elsewhere, or the lease is lost.
    fn start_heartbeat(
        &self,
        d: &Delivery,
        id: &str,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(heartbeat(
            self.store.clone(),
            self.queue.clone(),
            d.lease.clone(),
            id.to_owned(),
            self.config.visibility,
            stop.clone(),
        ))
    }

    /// After an interrupted or conflicting attempt: decide from the stored task what the message means.
    async fn settle_after_stop(&self, d: &Delivery, id: &str) -> Result<Handled, WorkerError> {
        let Some(task) = self.store.get_task(id).await? else {
            self.delete_quietly(&d.lease).await;
            return Ok(Handled::Dropped);
        };
        if task.spec.cancel_requested() && !task.phase().is_terminal() {
            self.cancel(&task).await?;
        }
        if task.phase().is_terminal() || task.spec.cancel_requested() {
            self.delete_quietly(&d.lease).await;
            return Ok(Handled::Dropped);
        }
        // Still running under someone else's lease, or ours was lost: leave the message alone.
        Ok(Handled::Released)
    }

    async fn cancel(&self, task: &TaskRecord) -> Result<(), WorkerError> {
        let status = AgentTaskStatus {
            phase: Some(TaskPhase::Cancelled),
            reason: Some("cancelled at the device's request".into()),
            ..task.status.clone()
        };
        match write_status(&*self.store, task, status).await {
            // Lost a race with the controller writing the same thing: fine.
            Ok(_)
            | Err(StoreError::Conflict { .. })
            | Err(StoreError::IllegalTransition { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A failed attempt: record why (best effort) and hand the message back for redelivery.
    async fn retry(
        &self,
        d: &Delivery,
        running: &TaskRecord,
        reason: &str,
    ) -> Result<Handled, WorkerError> {
        tracing::warn!(task = %running.id, attempt = d.receive_count, reason, "attempt failed; will retry");
        let status = AgentTaskStatus {
            reason: Some(format!("attempt {} failed: {reason}", d.receive_count)),
            ..running.status.clone()
        };
        if let Err(e) = write_status(&*self.store, running, status).await {
            tracing::debug!(task = %running.id, error = %e, "could not record the failed attempt");
        }
        let delay = self
            .config
            .retry_delay
            .saturating_mul(d.receive_count.max(1));
        match self.queue.release(&d.lease, delay).await {
            Ok(()) | Err(QueueError::LeaseExpired(_)) => Ok(Handled::Retry),
            Err(e) => Err(e.into()),
        }
    }

    /// A failure no retry can fix: the task ends Failed and the message is deleted.
    async fn fail(
        &self,
        d: &Delivery,
        running: &TaskRecord,
        reason: &str,
    ) -> Result<Handled, WorkerError> {
        tracing::warn!(task = %running.id, reason, "task failed");
        let status = AgentTaskStatus {
            phase: Some(TaskPhase::Failed),
            reason: Some(reason.to_owned()),
            ..running.status.clone()
        };
        match write_status(&*self.store, running, status).await {
            Ok(_) => {
                self.metrics
                    .inc("agentplane_task_transitions_total", &[("phase", "Failed")]);
                self.delete_quietly(&d.lease).await;
                Ok(Handled::Failed)
            }
            Err(StoreError::Conflict { .. }) => self.settle_after_stop(d, &running.id).await,
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_quietly(&self, lease: &LeaseId) {
        match self.queue.delete(lease).await {
            Ok(()) => {}
            // The work is recorded; a redelivery will find the task terminal and drop the message.
            Err(e) => tracing::warn!(error = %e, "could not delete a handled message"),
        }
    }

    /// Drains the dead-letter queue: each message's task ends Failed with the last recorded error.
    /// Publishes the queue's depth (what KEDA scales on) as a gauge, every few seconds.
    async fn sample_queue_depth(&self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(QUEUE_DEPTH_SAMPLE);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            match self.queue.depth().await {
                Ok(n) => self.metrics.set_gauge(
                    "agentplane_queue_depth",
                    &[],
                    i64::try_from(n).unwrap_or(i64::MAX),
                ),
                Err(e) => tracing::debug!(error = %e, "could not sample the queue depth"),
            }
        }
    }

    async fn reap_dead_letters(&self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.dead_letters.receive(10, self.config.visibility, self.config.wait) => r,
            };
            let deliveries = match received {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(error = %e, "dead-letter receive failed");
                    tokio::time::sleep(self.config.retry_delay).await;
                    continue;
                }
            };
            for d in deliveries {
                self.metrics.inc("agentplane_dead_letters_total", &[]);
                match self.reap(&d).await {
                    Ok(()) => {
                        if let Err(e) = self.dead_letters.delete(&d.lease).await {
                            tracing::warn!(error = %e, "could not delete a dead letter");
                        }
                    }
                    Err(e) => {
                        tracing::error!(message = %d.message_id, error = %e, "dead letter not settled; retried")
                    }
                }
            }
        }
    }

    async fn reap(&self, d: &Delivery) -> Result<(), WorkerError> {
        let Ok(msg) = serde_json::from_str::<QueueMessage>(&d.body) else {
            tracing::error!(message = %d.message_id, "unreadable dead letter dropped (it names no task)");
            return Ok(());
        };
        // A few tries: a late heartbeat or status write may race with us.
        for _ in 0..3 {
            let Some(task) = self.store.get_task(&msg.task.name).await? else {
                return Ok(());
            };
            if task.phase().is_terminal() {
                return Ok(());
            }
            let last = task
                .status
                .reason
                .clone()
                .unwrap_or_else(|| "no error recorded".into());
            let status = AgentTaskStatus {
                phase: Some(TaskPhase::Failed),
                reason: Some(format!(
                    "gave up: the work item reached the dead-letter queue; last error: {last}"
                )),
                ..task.status.clone()
            };
            match write_status(&*self.store, &task, status).await {
                Ok(_) => {
                    self.metrics
                        .inc("agentplane_task_transitions_total", &[("phase", "Failed")]);
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                // Not yet Queued (the controller's write was lost): the controller re-sends on its
                // next resync, so this dead letter carries nothing to settle.
                Err(StoreError::IllegalTransition { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Backend("task kept changing while being dead-lettered".into()).into())
    }
}

/// Keeps the message hidden while the model works and watches the task; cancels `stop` when the task
/// is cancelled or finished elsewhere, or when the lease is lost.
async fn heartbeat(
    store: DynStore,
    queue: DynQueue,
    lease: LeaseId,
    id: String,
    visibility: Duration,
    stop: CancellationToken,
) {
    let every = (visibility / 3).max(Duration::from_millis(100));
    // Re-read the task more often than the lease needs extending, so a cancel lands quickly.
    let check = every.min(Duration::from_millis(500));
    let mut since_extend = Duration::ZERO;
    loop {
        tokio::time::sleep(check).await;
        since_extend += check;
        if since_extend >= every {
            since_extend = Duration::ZERO;
            if let Err(e) = queue.extend(&lease, visibility).await {
                tracing::warn!(task = %id, error = %e, "lost the message lease");
                stop.cancel();
                return;
            }
        }
        match store.get_task(&id).await {
            Ok(Some(t)) if t.spec.cancel_requested() || t.phase().is_terminal() => {
                stop.cancel();
                return;
            }
            Ok(None) => {
                stop.cancel();
                return;
            }
            _ => {}
        }
    }
}
