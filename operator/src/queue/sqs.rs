//! The distributed [`TaskQueue`]: an Amazon SQS queue (aws-sdk-sqs), with its dead-letter queue
//! attached by a redrive policy so SQS itself moves a message after `maxReceiveCount` receives.
//!
//! The trait is shaped after SQS, so the mapping is one to one:
//! - [`LeaseId`] is the receipt handle of one receive;
//! - `receive` is ReceiveMessage (`MaxNumberOfMessages` 1..=10, `VisibilityTimeout` and
//!   `WaitTimeSeconds` in whole seconds rounded up and clamped to SQS's limits), asking for
//!   `ApproximateReceiveCount` and every message attribute;
//! - `extend` and `release` are ChangeMessageVisibility, `delete` is DeleteMessage;
//! - `depth` adds ApproximateNumberOfMessages, ...NotVisible and ...Delayed.
//!
//! Where SQS differs from the embedded queue (`super::sqlite`):
//! - **Stale leases.** Real SQS refuses a receipt handle once the message was received again:
//!   ChangeMessageVisibility answers `InvalidParameterValue` ("The receipt handle has expired"),
//!   `ReceiptHandleIsInvalid`, or `MessageNotInflight` when the message is visible again; all three
//!   become [`QueueError::LeaseExpired`]. For DeleteMessage on *standard* queues AWS documents that an
//!   older receipt handle "might succeed", so a worker that lost its lease may still delete the
//!   message; the worker's conditional completion write, not the queue, is what keeps effects
//!   exactly once. moto 5.2.5 (the test peer) accepts every receipt handle a message ever had, for
//!   extend and delete alike; `tests/queue_contract.rs` states that gap.
//! - **Deduplication.** Only FIFO queues (URL ending in `.fifo`) deduplicate, within SQS's 5-minute
//!   window, and a deduplicated send does not promise the first message's id. On standard queues
//!   `group_id` and `dedup_id` are ignored (SQS rejects a deduplication id there).
//! - **Attributes** are sent as `String` attributes; SQS refuses empty values, more than 10
//!   attributes and names outside its character set, and those refusals surface as
//!   [`QueueError::Backend`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use serde::Serialize;

use super::{Delivery, LeaseId, Outgoing, QueueError, TaskQueue};

/// SQS's longest visibility timeout (12 hours), in seconds.
pub const MAX_VISIBILITY_SECS: u64 = 43_200;
/// SQS's longest long-poll wait, in seconds.
pub const MAX_WAIT_SECS: u64 = 20;
/// SQS's most messages per ReceiveMessage.
pub const MAX_BATCH: usize = 10;
/// SQS's limits on a redrive policy's `maxReceiveCount`.
pub const MAX_RECEIVE_COUNT_LIMIT: u32 = 1000;
/// Longest queue name SQS accepts, `.fifo` suffix included.
const MAX_NAME_LEN: usize = 80;
const FIFO_SUFFIX: &str = ".fifo";
const DLQ_SUFFIX: &str = "-dlq";
/// Dead letters are kept as long as SQS allows (14 days), so an operator has time to look at them.
const DLQ_RETENTION_SECS: u32 = 1_209_600;

/// A [`TaskQueue`] on one SQS queue.
pub struct SqsQueue {
    client: Client,
    url: String,
    fifo: bool,
}

impl fmt::Debug for SqsQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsQueue")
            .field("url", &self.url)
            .field("fifo", &self.fifo)
            .finish()
    }
}

impl SqsQueue {
    /// A queue by URL. FIFO behaviour (group and deduplication ids) follows the URL: SQS requires
    /// every FIFO queue's name, hence its URL, to end in `.fifo`.
    pub fn new(client: Client, queue_url: String) -> Arc<Self> {
        let fifo = queue_url.ends_with(FIFO_SUFFIX);
        Arc::new(SqsQueue {
            client,
            url: queue_url,
            fifo,
        })
    }

    /// A queue by name, its URL looked up with GetQueueUrl.
    pub async fn from_name(client: Client, name: &str) -> Result<Arc<Self>, QueueError> {
        let out = client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| backend_error("GetQueueUrl", name, e))?;
        let url = out
            .queue_url()
            .ok_or_else(|| QueueError::Backend(format!("GetQueueUrl for {name}: no QueueUrl")))?;
        Ok(Self::new(client, url.to_owned()))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    async fn change_visibility(
        &self,
        op: &'static str,
        lease: &LeaseId,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(&lease.0)
            .visibility_timeout(whole_secs(visibility, MAX_VISIBILITY_SECS))
            .send()
            .await
            .map_err(|e| lease_error(op, &self.url, lease, e))?;
        Ok(())
    }
}

/// `d` in whole seconds, rounded up (a lease never ends earlier than asked) and capped at `max`.
fn whole_secs(d: Duration, max: u64) -> i32 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    // `max` is one of SQS's limits, far below i32::MAX.
    i32::try_from(secs.min(max)).unwrap_or(i32::MAX)
}

/// Whether an SQS error says the receipt handle no longer names a receive the caller holds.
fn is_stale_receipt(code: Option<&str>, message: Option<&str>) -> bool {
    match code {
        // The JSON protocol in query-compatible mode reports e.g.
        // `AWS.SimpleQueueService.MessageNotInflight`, older endpoints the bare name.
        Some(c) if c.ends_with("ReceiptHandleIsInvalid") || c.ends_with("MessageNotInflight") => {
            true
        }
        // "Value … for parameter ReceiptHandle is invalid. Reason: The receipt handle has expired."
        // The same code also covers bad visibility timeouts, which are not about the lease.
        Some("InvalidParameterValue") => {
            message.is_some_and(|m| m.to_ascii_lowercase().contains("receipt"))
        }
        _ => false,
    }
}

fn backend_error<E, R>(op: &str, queue: &str, e: SdkError<E, R>) -> QueueError
where
    E: std::error::Error + Send + Sync + 'static,
    R: fmt::Debug,
{
    QueueError::Backend(format!("{op} on {queue}: {}", DisplayErrorContext(&e)))
}

fn lease_error<E, R>(op: &str, queue: &str, lease: &LeaseId, e: SdkError<E, R>) -> QueueError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: fmt::Debug,
{
    if let Some(service) = e.as_service_error()
        && is_stale_receipt(service.code(), service.message())
    {
        return QueueError::LeaseExpired(lease.0.clone());
    }
    backend_error(op, queue, e)
}

#[async_trait]
impl TaskQueue for SqsQueue {
    async fn send(&self, m: Outgoing) -> Result<String, QueueError> {
        let mut req = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(m.body);
        for (name, value) in m.attributes {
            let value = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| QueueError::Backend(format!("message attribute {name}: {e}")))?;
            req = req.message_attributes(name, value);
        }
        if self.fifo {
            // FIFO queues require both ids. Without a deduplication id the embedded queue does not
            // deduplicate, so a fresh one keeps that meaning. Without a group id the message gets a
            // group of its own (its deduplication id): the embedded queue imposes no order, and one
            // shared group would make every message wait for the one before it.
            let dedup = m
                .dedup_id
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let group = m.group_id.unwrap_or_else(|| dedup.clone());
            req = req.message_group_id(group).message_deduplication_id(dedup);
        }
        let out = req
            .send()
            .await
            .map_err(|e| backend_error("SendMessage", &self.url, e))?;
        out.message_id().map(str::to_owned).ok_or_else(|| {
            QueueError::Backend(format!("SendMessage on {}: no MessageId", self.url))
        })
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let max = i32::try_from(max.clamp(1, MAX_BATCH)).unwrap_or(1);
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max)
            .visibility_timeout(whole_secs(visibility, MAX_VISIBILITY_SECS))
            .wait_time_seconds(whole_secs(wait, MAX_WAIT_SECS))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| backend_error("ReceiveMessage", &self.url, e))?;
        let mut deliveries = Vec::with_capacity(out.messages().len());
        for message in out.messages() {
            let (Some(receipt), Some(message_id)) =
                (message.receipt_handle(), message.message_id())
            else {
                // SQS always sends both; without a receipt handle the message could not be
                // acknowledged anyway, and it becomes visible again when its lease runs out.
                tracing::warn!(
                    queue = %self.url,
                    "ReceiveMessage returned a message without a receipt handle or id; skipped"
                );
                continue;
            };
            let receive_count = message
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|n| n.parse::<u32>().ok())
                // Asked for explicitly; if absent, this receive is at least the first.
                .unwrap_or(1);
            let mut attributes = BTreeMap::new();
            for (name, value) in message.message_attributes().into_iter().flatten() {
                // String and Number attributes carry a string value; Binary ones (from other
                // producers) have no place in the trait's string map.
                match value.string_value() {
                    Some(v) => {
                        attributes.insert(name.clone(), v.to_owned());
                    }
                    None => {
                        tracing::debug!(
                            queue = %self.url,
                            attribute = %name,
                            "non-string message attribute dropped"
                        )
                    }
                }
            }
            deliveries.push(Delivery {
                lease: LeaseId(receipt.to_owned()),
                message_id: message_id.to_owned(),
                body: message.body().unwrap_or_default().to_owned(),
                attributes,
                receive_count,
            });
        }
        Ok(deliveries)
    }

    async fn extend(&self, lease: &LeaseId, visibility: Duration) -> Result<(), QueueError> {
        self.change_visibility("ChangeMessageVisibility (extend)", lease, visibility)
            .await
    }

    async fn release(&self, lease: &LeaseId, delay: Duration) -> Result<(), QueueError> {
        self.change_visibility("ChangeMessageVisibility (release)", lease, delay)
            .await
    }

    async fn delete(&self, lease: &LeaseId) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(&lease.0)
            .send()
            .await
            .map_err(|e| lease_error("DeleteMessage", &self.url, lease, e))?;
        Ok(())
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        const COUNTS: [QueueAttributeName; 3] = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(COUNTS.to_vec()))
            .send()
            .await
            .map_err(|e| backend_error("GetQueueAttributes", &self.url, e))?;
        let mut total: u64 = 0;
        for name in COUNTS {
            let Some(value) = out.attributes().and_then(|a| a.get(&name)) else {
                continue;
            };
            let n: u64 = value.parse().map_err(|_| {
                QueueError::Backend(format!(
                    "GetQueueAttributes on {}: {} is not a count: {value:?}",
                    self.url,
                    name.as_str()
                ))
            })?;
            total = total.saturating_add(n);
        }
        Ok(total)
    }
}

/// The URLs of a main queue and its dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuePair {
    pub queue_url: String,
    pub dlq_url: String,
}

/// The names [`ensure_queue_pair`] gives the two queues for `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueNames {
    pub queue: String,
    pub dlq: String,
}

/// Derives the queue and DLQ names: `name` (or `name.fifo`) and `name-dlq` (or `name-dlq.fifo`).
/// A FIFO `name` may already carry the `.fifo` suffix.
pub fn queue_names(name: &str, fifo: bool) -> Result<QueueNames, QueueError> {
    let base = if fifo {
        name.strip_suffix(FIFO_SUFFIX).unwrap_or(name)
    } else {
        name
    };
    let invalid = |why: &str| QueueError::Backend(format!("invalid queue name {name:?}: {why}"));
    if base.is_empty() {
        return Err(invalid("empty"));
    }
    if !base
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "only ASCII letters, digits, '-' and '_' are allowed (plus '.fifo' on FIFO queues)",
        ));
    }
    let suffix = if fifo { FIFO_SUFFIX } else { "" };
    if base.len() + DLQ_SUFFIX.len() + suffix.len() > MAX_NAME_LEN {
        return Err(invalid(&format!(
            "too long: with the \"{DLQ_SUFFIX}{suffix}\" dead-letter suffix it exceeds {MAX_NAME_LEN} characters"
        )));
    }
    Ok(QueueNames {
        queue: format!("{base}{suffix}"),
        dlq: format!("{base}{DLQ_SUFFIX}{suffix}"),
    })
}

/// SQS's RedrivePolicy attribute. Built with serde so no input is spliced into JSON by hand.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RedrivePolicy<'a> {
    dead_letter_target_arn: &'a str,
    max_receive_count: u32,
}

fn redrive_policy_json(dlq_arn: &str, max_receive_count: u32) -> Result<String, QueueError> {
    serde_json::to_string(&RedrivePolicy {
        dead_letter_target_arn: dlq_arn,
        max_receive_count,
    })
    .map_err(QueueError::backend)
}

/// Creates (or finds, since CreateQueue with the same attributes is idempotent) a dead-letter queue
/// and a main queue that redrives to it after `max_receive_count` receives, with `visibility` as
/// the default visibility timeout of both. For tests, `agentplane worker` development setups and
/// benchmarks; production queues come from Terraform (`agentplane_queue`) or Crossplane.
///
/// An existing queue with other attributes is an error from SQS (`QueueNameExists`), never silently
/// reconfigured.
pub async fn ensure_queue_pair(
    client: &Client,
    name: &str,
    fifo: bool,
    max_receive_count: u32,
    visibility: Duration,
) -> Result<QueuePair, QueueError> {
    let names = queue_names(name, fifo)?;
    if !(1..=MAX_RECEIVE_COUNT_LIMIT).contains(&max_receive_count) {
        return Err(QueueError::Backend(format!(
            "maxReceiveCount {max_receive_count} is outside SQS's 1..={MAX_RECEIVE_COUNT_LIMIT}"
        )));
    }
    if visibility > Duration::from_secs(MAX_VISIBILITY_SECS) {
        return Err(QueueError::Backend(format!(
            "visibility timeout {visibility:?} exceeds SQS's {MAX_VISIBILITY_SECS} s"
        )));
    }
    let visibility = whole_secs(visibility, MAX_VISIBILITY_SECS).to_string();

    let mut dlq = client
        .create_queue()
        .queue_name(&names.dlq)
        .attributes(QueueAttributeName::VisibilityTimeout, &visibility)
        .attributes(
            QueueAttributeName::MessageRetentionPeriod,
            DLQ_RETENTION_SECS.to_string(),
        );
    if fifo {
        dlq = dlq.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let dlq_url = dlq
        .send()
        .await
        .map_err(|e| backend_error("CreateQueue", &names.dlq, e))?
        .queue_url()
        .map(str::to_owned)
        .ok_or_else(|| QueueError::Backend(format!("CreateQueue {}: no QueueUrl", names.dlq)))?;

    let attrs = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| backend_error("GetQueueAttributes", &dlq_url, e))?;
    let dlq_arn = attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .ok_or_else(|| {
            QueueError::Backend(format!("GetQueueAttributes on {dlq_url}: no QueueArn"))
        })?;

    let mut main = client
        .create_queue()
        .queue_name(&names.queue)
        .attributes(QueueAttributeName::VisibilityTimeout, &visibility)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            redrive_policy_json(dlq_arn, max_receive_count)?,
        );
    if fifo {
        main = main.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let queue_url = main
        .send()
        .await
        .map_err(|e| backend_error("CreateQueue", &names.queue, e))?
        .queue_url()
        .map(str::to_owned)
        .ok_or_else(|| QueueError::Backend(format!("CreateQueue {}: no QueueUrl", names.queue)))?;

    Ok(QueuePair { queue_url, dlq_url })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_up_and_clamp() {
        assert_eq!(whole_secs(Duration::ZERO, MAX_WAIT_SECS), 0);
        assert_eq!(whole_secs(Duration::from_millis(1), MAX_WAIT_SECS), 1);
        assert_eq!(whole_secs(Duration::from_millis(1500), MAX_WAIT_SECS), 2);
        assert_eq!(whole_secs(Duration::from_secs(2), MAX_WAIT_SECS), 2);
        assert_eq!(whole_secs(Duration::from_secs(60), MAX_WAIT_SECS), 20);
        assert_eq!(
            whole_secs(Duration::MAX, MAX_VISIBILITY_SECS),
            MAX_VISIBILITY_SECS as i32
        );
    }

    #[test]
    fn stale_receipt_errors_are_recognised() {
        assert!(is_stale_receipt(Some("ReceiptHandleIsInvalid"), None));
        assert!(is_stale_receipt(
            Some("AWS.SimpleQueueService.MessageNotInflight"),
            None
        ));
        assert!(is_stale_receipt(
            Some("InvalidParameterValue"),
            Some(
                "Value AQEB for parameter ReceiptHandle is invalid. Reason: The receipt handle has expired."
            )
        ));
        // A bad visibility timeout is the caller's mistake, not a lost lease.
        assert!(!is_stale_receipt(
            Some("InvalidParameterValue"),
            Some("Value 50000 for parameter VisibilityTimeout is invalid.")
        ));
        assert!(!is_stale_receipt(Some("InvalidParameterValue"), None));
        assert!(!is_stale_receipt(
            Some("AWS.SimpleQueueService.NonExistentQueue"),
            None
        ));
        assert!(!is_stale_receipt(None, None));
    }

    #[test]
    fn names_of_a_pair() {
        assert_eq!(
            queue_names("tasks", false).unwrap(),
            QueueNames {
                queue: "tasks".into(),
                dlq: "tasks-dlq".into()
            }
        );
        let fifo = QueueNames {
            queue: "tasks.fifo".into(),
            dlq: "tasks-dlq.fifo".into(),
        };
        assert_eq!(queue_names("tasks", true).unwrap(), fifo);
        assert_eq!(queue_names("tasks.fifo", true).unwrap(), fifo);
        // On a standard queue the dot is just an invalid character.
        assert!(queue_names("tasks.fifo", false).is_err());
        assert!(queue_names("", false).is_err());
        assert!(queue_names(".fifo", true).is_err());
        assert!(queue_names("a b", false).is_err());
        assert!(queue_names("x\"}", false).is_err());
        assert!(queue_names(&"a".repeat(76), false).is_ok());
        assert!(queue_names(&"a".repeat(77), false).is_err());
        assert!(queue_names(&"a".repeat(71), true).is_ok());
        assert!(queue_names(&"a".repeat(72), true).is_err());
    }

    #[test]
    fn redrive_policy_is_typed_json() {
        let json = redrive_policy_json("arn:aws:sqs:us-east-1:123456789012:q\"-dlq", 5).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "deadLetterTargetArn": "arn:aws:sqs:us-east-1:123456789012:q\"-dlq",
                "maxReceiveCount": 5
            })
        );
    }

    #[test]
    fn fifo_follows_the_url() {
        let conf = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .build();
        let client = Client::from_conf(conf);
        let q = SqsQueue::new(client.clone(), "http://h/1/tasks.fifo".into());
        assert!(q.is_fifo());
        assert_eq!(q.url(), "http://h/1/tasks.fifo");
        assert!(!SqsQueue::new(client, "http://h/1/tasks".into()).is_fifo());
    }
}
