//! Draining the outbox: the sender submits pending intents in sequence order, and the tracker follows
//! accepted tasks until they finish, storing phases and results beside the intent.
//!
//! Both loops sleep when idle (woken early by a capture) and back off with jitter after failures, so a
//! dead, slow or garbage-answering gateway never causes a tight loop. Everything they do is idempotent:
//! a resend of an already-accepted envelope is answered `duplicate` by the gateway, so a crash between the
//! gateway's 202 and our `mark_sent` costs one extra request, never a second task.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_api::wire::SubmitResponse;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::backoff::Backoff;
use crate::capture::LocalPolicy;
use crate::gateway::{GatewayClient, GatewayError};
use crate::identity::DeviceSigner;
use crate::outbox::{Entry, Outbox, TaskUpdate};

/// Pending entries read per round of the submit loop.
const PAGE: usize = 64;

/// What the UI shows about the connection to the gateway.
#[derive(Serialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct LinkState {
    /// `None` until the first contact attempt.
    pub online: Option<bool>,
    pub gateway: Option<String>,
    pub last_error: Option<String>,
    pub last_contact: Option<String>,
    /// When the sender will try again after a failure (RFC 3339).
    pub next_retry_at: Option<String>,
    pub consecutive_failures: u32,
}

/// Shared, cheap-to-read link state.
#[derive(Default)]
pub struct Link(Mutex<LinkState>);

impl Link {
    pub fn snapshot(&self) -> LinkState {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set_gateway(&self, gateway: &str) {
        let gateway = gateway.to_owned();
        self.update(|s| s.gateway = Some(gateway));
    }

    fn update(&self, f: impl FnOnce(&mut LinkState)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    fn ok(&self) {
        self.update(|s| {
            s.online = Some(true);
            s.last_error = None;
            s.next_retry_at = None;
            s.consecutive_failures = 0;
            s.last_contact = Some(jiff::Timestamp::now().to_string());
        });
    }

    fn failed(&self, err: &GatewayError, failures: u32, retry_in: Duration) {
        let reached = err.reached_gateway();
        self.update(|s| {
            // A gateway that answers with errors is reachable, but the device is not getting through.
            s.online = Some(false);
            if reached {
                s.last_contact = Some(jiff::Timestamp::now().to_string());
            }
            s.last_error = Some(err.to_string());
            s.consecutive_failures = failures;
            s.next_retry_at = jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::try_from(retry_in).unwrap_or_default())
                .ok()
                .map(|t| t.to_string());
        });
    }
}

#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Most submissions in flight at once. 1 (the default) keeps arrival order equal to sequence order
    /// even across connections; more is faster but lets the network reorder neighbours.
    pub max_in_flight: usize,
    pub backoff: Backoff,
    /// How often an idle loop looks at the outbox anyway (another process, e.g. `submit`, may write it).
    pub idle_poll: Duration,
    /// Pause between status polls of running tasks.
    pub poll_interval: Duration,
    pub policy: LocalPolicy,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            max_in_flight: 1,
            backoff: Backoff::default(),
            idle_poll: Duration::from_secs(1),
            poll_interval: Duration::from_millis(500),
            policy: LocalPolicy::default(),
        }
    }
}

/// The pieces both loops share.
#[derive(Clone)]
pub struct Sender {
    pub outbox: Outbox,
    pub client: GatewayClient,
    pub signer: Arc<dyn DeviceSigner>,
    pub device_id: String,
    pub cfg: SenderConfig,
    pub link: Arc<Link>,
    /// Notified on every capture.
    pub wake: Arc<Notify>,
    /// Notified when the sender got something accepted (the tracker has work).
    pub accepted: Arc<Notify>,
}

impl Sender {
    /// Submits pending intents forever.
    pub async fn run_submit_loop(self) {
        let mut failures = 0u32;
        loop {
            let page = match self.outbox.pending(PAGE).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            if page.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.cfg.idle_poll) => {}
                }
                continue;
            }
            match self.submit_page(page).await {
                None => failures = 0,
                Some((err, hint)) => {
                    failures = failures.saturating_add(1);
                    let delay = self.cfg.backoff.delay(failures, hint);
                    tracing::warn!(error = %err, failures, retry_in_ms = delay.as_millis() as u64, "gateway submit failed; backing off");
                    self.link.failed(&err, failures, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends a page of pending entries in sequence order, `max_in_flight` at a time, stopping at the first
    /// retryable failure (which it returns). Acceptances are recorded in batches: one transaction per
    /// batch instead of one fsync per intent. A crash before a batch is recorded only means those
    /// envelopes are sent again and answered `duplicate`.
    async fn submit_page(&self, page: Vec<Entry>) -> Option<(GatewayError, Option<Duration>)> {
        let mut sendable = Vec::with_capacity(page.len());
        for entry in page {
            if entry.privacy == "private" && !self.cfg.policy.allow_private_upload {
                // Captured under a looser policy; the current one keeps it here.
                let _ = self
                    .outbox
                    .mark_held(
                        &entry.task_id,
                        "local policy keeps private intents on this device",
                    )
                    .await;
                continue;
            }
            sendable.push(entry);
        }
        let mut accepted: Vec<(String, String)> = Vec::new();
        let mut last_flush = tokio::time::Instant::now();
        let mut failure = None;
        for chunk in sendable.chunks(self.cfg.max_in_flight.max(1)) {
            let results = self.send_chunk(chunk).await;
            for (entry, result) in chunk.iter().zip(results) {
                match result {
                    Ok(resp) => {
                        self.link.ok();
                        if resp.task_id != entry.task_id {
                            tracing::warn!(ours = %entry.task_id, theirs = %resp.task_id, "gateway answered for another task id");
                        }
                        tracing::info!(task_id = %entry.task_id, seq = entry.seq, duplicate = resp.duplicate, "intent delivered");
                        accepted.push((entry.task_id.clone(), resp.phase.as_str().to_owned()));
                    }
                    Err(e) if e.is_permanent() => {
                        tracing::warn!(task_id = %entry.task_id, error = %e, "gateway refused intent for good");
                        self.link.ok();
                        if let Err(err) = self
                            .outbox
                            .mark_rejected(&entry.task_id, &e.to_string())
                            .await
                        {
                            tracing::error!(task_id = %entry.task_id, error = %err, "cannot record the refusal");
                        }
                    }
                    Err(e) => {
                        if let Err(err) = self
                            .outbox
                            .mark_attempt_failed(&entry.task_id, &e.to_string())
                            .await
                        {
                            tracing::error!(task_id = %entry.task_id, error = %err, "cannot record the failed attempt");
                        }
                        if failure.is_none() {
                            let hint = e.retry_after();
                            failure = Some((e, hint));
                        }
                    }
                }
            }
            if failure.is_some() {
                break;
            }
            // Keep the UI current while a long page drains.
            if last_flush.elapsed() > Duration::from_millis(200) {
                self.flush_accepted(std::mem::take(&mut accepted)).await;
                last_flush = tokio::time::Instant::now();
            }
        }
        self.flush_accepted(accepted).await;
        failure
    }

    async fn flush_accepted(&self, accepted: Vec<(String, String)>) {
        if accepted.is_empty() {
            return;
        }
        if let Err(e) = self.outbox.mark_sent_many(accepted).await {
            tracing::error!(error = %e, "cannot record deliveries (they will be resent and answered as duplicates)");
        }
        self.accepted.notify_one();
    }

    /// Sends a chunk concurrently; results come back in the chunk's order.
    async fn send_chunk(&self, chunk: &[Entry]) -> Vec<Result<SubmitResponse, GatewayError>> {
        if let [entry] = chunk {
            return vec![
                self.client
                    .submit(&entry.envelope, &entry.traceparent)
                    .await,
            ];
        }
        let mut set = JoinSet::new();
        for (i, entry) in chunk.iter().enumerate() {
            let client = self.client.clone();
            let envelope = entry.envelope.clone();
            let traceparent = entry.traceparent.clone();
            set.spawn(async move { (i, client.submit(&envelope, &traceparent).await) });
        }
        let mut results: Vec<Option<Result<SubmitResponse, GatewayError>>> =
            (0..chunk.len()).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, r)) = joined {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(GatewayError::Unreachable("submission task failed".into())))
            })
            .collect()
    }

    /// Follows accepted tasks until they reach a terminal phase.
    pub async fn run_track_loop(self) {
        let mut failures = 0u32;
        loop {
            let active = match self.outbox.in_progress(64).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            if active.is_empty() {
                tokio::select! {
                    _ = self.accepted.notified() => {}
                    _ = tokio::time::sleep(self.cfg.idle_poll) => {}
                }
                continue;
            }
            let mut any_failed = None;
            let mut updates = Vec::new();
            // Bounded concurrency: a few polls at a time.
            for chunk in active.chunks(4) {
                let mut set = JoinSet::new();
                for entry in chunk {
                    let client = self.client.clone();
                    let signer = self.signer.clone();
                    let device = self.device_id.clone();
                    let id = entry.task_id.clone();
                    set.spawn(async move {
                        let r = client.task(&id, &device, signer.as_ref()).await;
                        (id, r)
                    });
                }
                while let Some(joined) = set.join_next().await {
                    let Ok((id, result)) = joined else { continue };
                    match result {
                        Ok(view) => updates.push(TaskUpdate {
                            task_id: id,
                            phase: view.phase.as_str().to_owned(),
                            terminal: view.phase.is_terminal(),
                            result: view.result,
                            reason: view.reason,
                        }),
                        Err(e) => {
                            tracing::debug!(task_id = %id, error = %e, "task status poll failed");
                            let _ = self.outbox.touch_polled(&id).await;
                            any_failed.get_or_insert(e);
                        }
                    }
                }
            }
            // One transaction for the whole round.
            if let Err(e) = self.outbox.record_tasks(updates).await {
                tracing::error!(error = %e, "cannot store task status");
            }
            let pause = match any_failed {
                Some(e) => {
                    failures = failures.saturating_add(1);
                    self.cfg
                        .backoff
                        .delay(failures, e.retry_after())
                        .max(self.cfg.poll_interval)
                }
                None => {
                    failures = 0;
                    self.cfg.poll_interval
                }
            };
            tokio::time::sleep(pause).await;
        }
    }
}
