//! Runs the intents that stay on the device (`private` ones, and `regulated` ones when the policy says
//! `local`) on the local model, one at a time, in capture order.
//!
//! The outbox is the durable queue: an entry stays `local` until the model's answer (or the reason it
//! failed for good) is recorded, so a crash or restart mid-call runs it again. A model that is down or
//! busy is retried with backoff and the entry shows the last error; an answer that is not a chat
//! completion, or one too large, fails that intent with the reason. Nothing here talks to the gateway.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::local_model::LocalModel;
use crate::outbox::{Entry, Outbox};

/// Shown on queued local entries while the agent runs without `--local-model`.
pub const NO_LOCAL_MODEL: &str = "no local model is configured: this intent stays on the device until the agent runs with --local-model URL";

/// How often the queue is read when nothing woke the runner (captures by `agentplane-edge submit` in
/// another process cannot wake it).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Entries read from the queue at a time.
const BATCH: usize = 8;

#[derive(Clone)]
pub struct LocalRunner {
    pub outbox: Outbox,
    /// `None`: the agent runs without `--local-model`; queued entries are kept and say why.
    pub model: Option<LocalModel>,
    pub wake: Arc<Notify>,
    pub backoff: Backoff,
}

impl LocalRunner {
    pub async fn run(self) {
        let mut failures: u32 = 0;
        loop {
            let batch = match self.outbox.local_queue(BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "cannot read the local queue");
                    tokio::time::sleep(self.backoff.delay(failures, None)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                let _ = tokio::time::timeout(IDLE_POLL, self.wake.notified()).await;
                continue;
            }
            let Some(model) = &self.model else {
                self.report_no_model(&batch).await;
                let _ = tokio::time::timeout(IDLE_POLL * 30, self.wake.notified()).await;
                continue;
            };
            for entry in batch {
                if self.run_one(model, &entry).await {
                    failures = 0;
                } else {
                    failures += 1;
                    tokio::time::sleep(self.backoff.delay(failures, None)).await;
                    // Start over from the oldest: the one that failed goes first again.
                    break;
                }
            }
        }
    }

    /// Runs one entry; false when the model could not be reached (the entry stays queued).
    async fn run_one(&self, model: &LocalModel, entry: &Entry) -> bool {
        let span = tracing::info_span!("edge.local_model", task_id = %entry.task_id, intent = %entry.intent_type);
        let outcome = model
            .complete(&entry.intent_type, &entry.prompt)
            .instrument(span)
            .await;
        let recorded = match outcome {
            Ok(c) => {
                tracing::info!(task_id = %entry.task_id, model = ?c.model, "ran on the local model");
                self.outbox
                    .record_local(&entry.task_id, "Succeeded", Some(c.text), None)
                    .await
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(task_id = %entry.task_id, error = %e, "local model unavailable; will retry");
                if let Err(oe) = self
                    .outbox
                    .mark_local_attempt_failed(&entry.task_id, &e.to_string())
                    .await
                {
                    tracing::warn!(error = %oe, "cannot record the failed attempt");
                }
                return false;
            }
            Err(e) => {
                tracing::warn!(task_id = %entry.task_id, error = %e, "local model failed the intent");
                self.outbox
                    .record_local(&entry.task_id, "Failed", None, Some(e.to_string()))
                    .await
            }
        };
        match recorded {
            Ok(()) => true,
            Err(e) => {
                // The answer is lost but the entry is still queued: it runs again, never disappears.
                tracing::warn!(task_id = %entry.task_id, error = %e, "cannot store the local result; will run it again");
                false
            }
        }
    }

    async fn report_no_model(&self, batch: &[Entry]) {
        for e in batch
            .iter()
            .filter(|e| e.last_error.as_deref() != Some(NO_LOCAL_MODEL))
        {
            tracing::warn!(task_id = %e.task_id, "{NO_LOCAL_MODEL}");
            if let Err(err) = self
                .outbox
                .mark_local_attempt_failed(&e.task_id, NO_LOCAL_MODEL)
                .await
            {
                tracing::warn!(error = %err, "cannot record why the intent waits");
            }
        }
    }
}
