//! `agentplane worker --task NS/NAME`: the worker a GPU Job's pod runs, for exactly one task.
//!
//! It hands [`Worker::handle`] one synthetic delivery for the task over a [`OneTaskQueue`], so the
//! task goes through the very code a queued task does: re-read, Queued -> Running with a conditional
//! write, the model call, and the completion written conditionally on the version read at Running.
//! A second pod for the same task (a Job retry, a duplicate) therefore finds the task terminal and
//! writes nothing, or loses the conditional write; the task is completed exactly once. There is no
//! queue message to hide or hand back: the Job's backoffLimit is the retry.

use std::time::Duration;

use async_trait::async_trait;

use super::{Handled, Worker, WorkerError};
use crate::controller::gpu_job::{JOB_MESSAGE_PREFIX, job_name};
use crate::queue::{Delivery, LeaseId, Outgoing, QueueError, QueueMessage, TaskQueue, TaskRef};

/// A "queue" holding the one delivery a GPU Job's pod runs: acknowledging it does nothing, there is
/// nothing to receive, and nothing can be sent through it.
pub struct OneTaskQueue;

#[async_trait]
impl TaskQueue for OneTaskQueue {
    async fn send(&self, _message: Outgoing) -> Result<String, QueueError> {
        Err(QueueError::backend("a one-task worker sends no work items"))
    }

    async fn receive(
        &self,
        _max: usize,
        _visibility: Duration,
        _wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        Ok(Vec::new())
    }

    async fn extend(&self, _lease: &LeaseId, _visibility: Duration) -> Result<(), QueueError> {
        Ok(())
    }

    async fn release(&self, _lease: &LeaseId, _delay: Duration) -> Result<(), QueueError> {
        Ok(())
    }

    async fn delete(&self, _lease: &LeaseId) -> Result<(), QueueError> {
        Ok(())
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        Ok(0)
    }
}

/// Runs task `name` of `namespace` once through `worker` (whose queues should be [`OneTaskQueue`]).
/// `Ok(None)`: there is no such task.
pub async fn run_one(
    worker: &Worker,
    namespace: &str,
    name: &str,
) -> Result<Option<Handled>, WorkerError> {
    let Some(task) = worker.store.get_task(name).await? else {
        return Ok(None);
    };
    let tier = task
        .status
        .model
        .as_ref()
        .and_then(|m| m.selected.clone())
        .unwrap_or_default();
    let receive_count = task.status.queue.as_ref().map_or(0, |q| q.receive_count) + 1;
    let body = QueueMessage {
        task: TaskRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: name.to_owned(),
        },
        tier,
        attempt: receive_count - 1,
    };
    let delivery = Delivery {
        lease: LeaseId(format!("job:{name}")),
        // The dispatch the controller recorded (a plan approved at a step runs on a later Job than
        // the first); the operator watches the Job this names.
        message_id: task
            .status
            .queue
            .as_ref()
            .and_then(|q| q.message_id.clone())
            .filter(|m| m.starts_with(JOB_MESSAGE_PREFIX))
            .unwrap_or_else(|| format!("{JOB_MESSAGE_PREFIX}{}", job_name(name))),
        body: serde_json::to_string(&body).map_err(QueueError::backend)?,
        attributes: Default::default(),
        receive_count,
    };
    worker.handle(&delivery).await.map(Some)
}

/// Splits `NS/NAME`.
pub fn parse_task_ref(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("--task must be NAMESPACE/NAME, got {raw:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_refs_are_namespace_slash_name() {
        assert_eq!(
            parse_task_ref("ns/t-1").unwrap(),
            ("ns".to_owned(), "t-1".to_owned())
        );
        for bad in ["t-1", "/t", "ns/", "a/b/c"] {
            assert!(parse_task_ref(bad).is_err(), "{bad}");
        }
    }
}
