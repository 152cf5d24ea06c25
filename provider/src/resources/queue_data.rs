//! Data source `agentplane_queue`: looks an existing queue (and its dead-letter queue) up by
//! name.

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName as A;

use super::label;
use super::queue::{observe, url_for, validate_name};
use crate::config::ProviderData;
use crate::framework::{Attribute, Block, DataSource, Diagnostics, Schema, Value};

pub struct QueueData;

pub const TYPE: &str = "agentplane_queue";

#[async_trait]
impl DataSource<ProviderData> for QueueData {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: Block::new(
                "Reads an existing SQS queue by name, e.g. one created by another workspace.",
            )
            .attr(Attribute::string("name").required().describe("Queue name."))
            .attr(
                Attribute::string("id")
                    .computed()
                    .describe("The queue URL."),
            )
            .attr(Attribute::string("url").computed().describe("Queue URL."))
            .attr(Attribute::string("arn").computed().describe("Queue ARN."))
            .attr(
                Attribute::bool("fifo")
                    .computed()
                    .describe("Whether the queue is FIFO."),
            )
            .attr(
                Attribute::number("visibility_timeout_seconds")
                    .computed()
                    .describe("Visibility timeout."),
            )
            .attr(
                Attribute::number("message_retention_seconds")
                    .computed()
                    .describe("Retention."),
            )
            .attr(
                Attribute::number("receive_wait_time_seconds")
                    .computed()
                    .describe("Long-poll wait."),
            )
            .attr(
                Attribute::string("kms_master_key_id")
                    .computed()
                    .describe("KMS key, if any."),
            )
            .attr(
                Attribute::number("max_receive_count")
                    .computed()
                    .describe("Redrive threshold, if the queue has a dead-letter queue."),
            )
            .attr(
                Attribute::string("dlq_arn")
                    .computed()
                    .describe("Dead-letter queue ARN, if any."),
            )
            .attr(Attribute::string_map("tags").computed().describe("Tags.")),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        if let Some(n) = config.get("name").as_str() {
            validate_name(n, None, diags);
        }
    }

    async fn read(&self, data: &ProviderData, config: &Value) -> Result<Value, Diagnostics> {
        let name = config.get("name").as_str().unwrap_or_default();
        let w = format!("data.{}", label(TYPE, Some(name)));
        let c = data.sqs().await;
        let not_found = || {
            Diagnostics::single(
                format!("Queue {name:?} not found"),
                format!("{w}: no SQS queue named {name:?} exists in this region/endpoint."),
            )
        };
        let url = url_for(c, name, &w).await?.ok_or_else(not_found)?;
        let q = observe(c, &url, &w).await?.ok_or_else(not_found)?;
        let mut s = config.clone();
        s.set("id", Value::string(&url));
        s.set("url", Value::string(&url));
        s.set("arn", Value::opt_string(q.attrs.get(&A::QueueArn).cloned()));
        s.set("fifo", Value::Bool(q.flag(A::FifoQueue)));
        for (attr, a) in [
            ("visibility_timeout_seconds", A::VisibilityTimeout),
            ("message_retention_seconds", A::MessageRetentionPeriod),
            (
                "receive_wait_time_seconds",
                A::ReceiveMessageWaitTimeSeconds,
            ),
        ] {
            s.set(attr, q.num(a).map_or(Value::Null, Value::int));
        }
        s.set(
            "kms_master_key_id",
            Value::opt_string(
                q.attrs
                    .get(&A::KmsMasterKeyId)
                    .filter(|k| !k.is_empty())
                    .cloned(),
            ),
        );
        let (dlq, n) = q.redrive().map_or((Value::Null, Value::Null), |(a, n)| {
            (Value::String(a), Value::int(n))
        });
        s.set("dlq_arn", dlq);
        s.set("max_receive_count", n);
        s.set("tags", Value::from_string_map(q.tags));
        Ok(s)
    }
}
