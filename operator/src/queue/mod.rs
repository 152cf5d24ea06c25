//! The task queue: at-least-once delivery with visibility timeouts, redelivery counts and a
//! dead-letter queue, shaped after SQS so the distributed backend ([`sqs`]) maps one to one:
//! - [`LeaseId`] is an SQS receipt handle: it names one *receive* of a message, so a worker whose
//!   lease expired (and whose message went to someone else) can no longer delete or extend it;
//! - `receive` long-polls up to `wait`; `extend` is ChangeMessageVisibility; `release` is
//!   ChangeMessageVisibility with the redelivery delay;
//! - redrive to the dead-letter queue happens inside `receive`, as SQS does it: a message that was
//!   already received `maxReceiveCount` times moves to the DLQ instead of being handed out again. The
//!   DLQ is itself a [`TaskQueue`], drained by the worker's reaper.

pub mod sqlite;
pub mod sqs;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Identifies one receive of one message (an SQS receipt handle).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub String);

/// Message attribute names (DESIGN.md §3).
pub const ATTR_TRACEPARENT: &str = "traceparent";
pub const ATTR_TASK_ID: &str = "taskId";

/// The queue message body (DESIGN.md §3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueMessage {
    pub task: TaskRef,
    /// Name of the model tier the controller selected.
    pub tier: String,
    pub attempt: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskRef {
    pub namespace: String,
    pub name: String,
    /// Object uid (Kubernetes); the embedded store uses the task id.
    pub uid: String,
}

/// A message to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub body: String,
    pub attributes: BTreeMap<String, String>,
    /// FIFO MessageGroupId (the device id).
    pub group_id: Option<String>,
    /// FIFO MessageDeduplicationId (the task id): a second send with the same id while the first
    /// message still exists is dropped and answered with the first message's id.
    pub dedup_id: Option<String>,
}

/// A received message.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub lease: LeaseId,
    pub message_id: String,
    pub body: String,
    pub attributes: BTreeMap<String, String>,
    /// How many times the message has been received, this receive included (ApproximateReceiveCount).
    pub receive_count: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lease is no longer valid: the visibility timeout ran out and the message was received again
    /// (or deleted). The holder must stop treating the message as its own.
    #[error("lease {0:?} is no longer valid")]
    LeaseExpired(String),
    #[error("queue backend: {0}")]
    Backend(String),
}

impl QueueError {
    pub fn backend(e: impl std::fmt::Display) -> Self {
        QueueError::Backend(e.to_string())
    }
}

#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Sends a message; returns its message id.
    async fn send(&self, message: Outgoing) -> Result<String, QueueError>;

    /// Receives up to `max` visible messages, hiding each for `visibility`; waits up to `wait` for one.
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;

    /// Keeps a received message hidden for `visibility` from now (a heartbeat).
    async fn extend(&self, lease: &LeaseId, visibility: Duration) -> Result<(), QueueError>;

    /// Makes a received message visible again after `delay` (a failed attempt).
    async fn release(&self, lease: &LeaseId, delay: Duration) -> Result<(), QueueError>;

    /// Deletes a received message: the work is done.
    async fn delete(&self, lease: &LeaseId) -> Result<(), QueueError>;

    /// Messages waiting (visible or in flight): the number KEDA scales on.
    async fn depth(&self) -> Result<u64, QueueError>;
}

pub type DynQueue = Arc<dyn TaskQueue>;
