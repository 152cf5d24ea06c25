//! Draining the outbox: the sender submits pending intents in sequence order, a bounded window of them
//! in flight, and the tracker follows accepted tasks until they finish, storing phases and results
//! beside the intent.
//!
//! Both loops sleep when idle (woken early by a capture) and back off with jitter after failures, so a
//! dead, slow or garbage-answering gateway never causes a tight loop. Everything they do is idempotent:
//! a resend of an already-accepted envelope is answered `duplicate` by the gateway, so a crash between the
//! gateway's 202 and our `mark_sent` costs one extra request, never a second task.

mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_api::device::SEQ_WINDOW;
use agentplane_api::wire::SubmitResponse;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::capture::LocalPolicy;
use crate::gateway::{GatewayClient, GatewayError};
use crate::identity::DeviceSigner;
use crate::outbox::{Outbox, OutboxError, TaskUpdate};
pub use window::{Outcome, Window};

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

/// Submissions in flight by default: enough to hide the gateway's admission round trip, well inside
/// its replay window ([`SEQ_WINDOW`]).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;

/// Acceptances recorded in the outbox at least this often while draining (one transaction each).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// ... or as soon as this many are waiting.
const FLUSH_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Most submissions in flight at once, at most [`SEQ_WINDOW`] (the gateway's replay window: with
    /// more, an early entry could fall out of it while later ones are accepted). Entries go out in seq
    /// order; they may arrive out of order, which the gateway's window admits.
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
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
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

/// A finished submission: the entry's seq and task id, and the gateway's answer.
type Answer = (u64, String, Result<SubmitResponse, GatewayError>);

impl Sender {
    /// Submits pending intents forever: up to `max_in_flight` at once, dispatched in seq order (see
    /// [`Window`]), each entry retried on its own backoff until the gateway takes it or refuses it for
    /// good. An entry is marked sent only after the gateway's 202 (new or duplicate), in batches: one
    /// transaction per batch instead of one fsync per intent. A crash before a batch is recorded only
    /// means those envelopes are sent again and answered `duplicate`.
    pub async fn run_submit_loop(self) {
        let mut window = Window::new(self.cfg.max_in_flight);
        let mut requests: JoinSet<Answer> = JoinSet::new();
        let mut in_request: HashMap<tokio::task::Id, (u64, String)> = HashMap::new();
        let mut accepted: Vec<(String, String)> = Vec::new();
        let mut last_flush = Instant::now();
        // Whether the outbox may hold pending entries above the window's cursor.
        let mut more_pending = true;
        let mut next_look = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_look {
                more_pending = true;
                next_look = now + self.cfg.idle_poll;
            }
            // Refill when half the window is free (or it ran dry), not after every answer.
            if more_pending
                && (window.room() >= SEQ_WINDOW as usize / 2 || window.is_empty())
                && window.room() > 0
            {
                match self.refill(&mut window, now).await {
                    Ok(full) => more_pending = full,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the outbox");
                        more_pending = false;
                        next_look = now + Duration::from_secs(5);
                    }
                }
            }
            while let Some(entry) = window.next(Instant::now()) {
                let client = self.client.clone();
                let (seq, task_id) = (entry.seq, entry.task_id.clone());
                let handle = requests.spawn(async move {
                    let r = client.submit(&entry.envelope, &entry.traceparent).await;
                    (entry.seq, entry.task_id, r)
                });
                in_request.insert(handle.id(), (seq, task_id));
            }
            let idle = requests.is_empty() && window.is_empty();
            if !accepted.is_empty()
                && (idle || accepted.len() >= FLUSH_BATCH || last_flush.elapsed() >= FLUSH_EVERY)
            {
                self.flush_accepted(&mut accepted).await;
                last_flush = Instant::now();
            }
            let mut deadline = next_look;
            if let Some(at) = window.wake_at() {
                deadline = deadline.min(at);
            }
            if !accepted.is_empty() {
                deadline = deadline.min(last_flush + FLUSH_EVERY);
            }
            tokio::select! {
                Some(joined) = requests.join_next_with_id(), if !requests.is_empty() => {
                    let answer = match joined {
                        Ok((id, answer)) => {
                            in_request.remove(&id);
                            answer
                        }
                        Err(e) => {
                            // The request task died (it does not panic; but never lose track of it).
                            let Some((seq, task_id)) = in_request.remove(&e.id()) else { continue };
                            (seq, task_id, Err(GatewayError::Unreachable(format!("submission task failed: {e}"))))
                        }
                    };
                    self.settle(&mut window, &mut accepted, answer).await;
                }
                _ = self.wake.notified() => {
                    more_pending = true;
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Reads pending entries above the window's cursor into it; entries the current local policy keeps
    /// on the device are marked held instead. Returns whether the read filled the room (more may wait).
    async fn refill(&self, window: &mut Window, now: Instant) -> Result<bool, OutboxError> {
        let room = window.room();
        let page = self.outbox.pending_after(window.cursor(), room).await?;
        let full = page.len() == room;
        for entry in page {
            let (seq, task_id, private) =
                (entry.seq, entry.task_id.clone(), entry.privacy == "private");
            window.add(entry, now);
            if private && !self.cfg.policy.allow_private_upload {
                // Captured under a looser policy; the current one keeps it here.
                window.drop_entry(seq);
                if let Err(e) = self
                    .outbox
                    .mark_held(
                        &task_id,
                        "local policy keeps private intents on this device",
                    )
                    .await
                {
                    tracing::error!(task_id = %task_id, error = %e, "cannot record that an intent is kept local");
                }
            }
        }
        Ok(full)
    }

    /// Applies one answer: accepted entries wait in `accepted` for the next batch write; refusals
    /// for good are recorded at once and never block the others; anything else is retried.
    async fn settle(
        &self,
        window: &mut Window,
        accepted: &mut Vec<(String, String)>,
        (seq, task_id, result): Answer,
    ) {
        let now = Instant::now();
        match result {
            Ok(resp) => {
                self.link.ok();
                if resp.task_id != task_id {
                    tracing::warn!(ours = %task_id, theirs = %resp.task_id, "gateway answered for another task id");
                }
                tracing::debug!(task_id = %task_id, seq, duplicate = resp.duplicate, "intent delivered");
                accepted.push((task_id, resp.phase.as_str().to_owned()));
                window.outcome(seq, Outcome::Settled, now, |_| Duration::ZERO);
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(task_id = %task_id, seq, error = %e, "gateway refused intent for good");
                self.link.ok();
                if let Err(err) = self.outbox.mark_rejected(&task_id, &e.to_string()).await {
                    tracing::error!(task_id = %task_id, error = %err, "cannot record the refusal");
                }
                window.outcome(seq, Outcome::Settled, now, |_| Duration::ZERO);
            }
            Err(e) => {
                if let Err(err) = self
                    .outbox
                    .mark_attempt_failed(&task_id, &e.to_string())
                    .await
                {
                    tracing::error!(task_id = %task_id, error = %err, "cannot record the failed attempt");
                }
                let hint = e.retry_after();
                let backoff = self.cfg.backoff;
                if let Some((failures, pause)) =
                    window.outcome(seq, Outcome::Retry, now, |n| backoff.delay(n, hint))
                {
                    tracing::warn!(task_id = %task_id, seq, error = %e, failures, retry_in_ms = pause.as_millis() as u64, "gateway submit failed; backing off");
                    self.link.failed(&e, failures, pause);
                }
            }
        }
    }

    /// Records a batch of acceptances (one transaction). On failure they are kept for the next try:
    /// the gateway has them, only the outbox does not know yet.
    async fn flush_accepted(&self, accepted: &mut Vec<(String, String)>) {
        if accepted.is_empty() {
            return;
        }
        match self.outbox.mark_sent_many(accepted.clone()).await {
            Ok(()) => {
                accepted.clear();
                self.accepted.notify_one();
            }
            Err(e) => {
                tracing::error!(error = %e, pending = accepted.len(), "cannot record deliveries yet; retrying")
            }
        }
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
