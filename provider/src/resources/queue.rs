//! `agentplane_queue`: an SQS work queue together with its dead-letter queue and redrive
//! policy, all as typed attributes (the redrive JSON never reaches the user).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName as A;

use super::{label, tag_diff, tags_value, validate_tags};
use crate::aws;
use crate::config::ProviderData;
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Validator, Value,
};

pub const TYPE: &str = "agentplane_queue";

pub struct Queue;

/// AWS limits (SQS developer guide).
pub const VISIBILITY: (i64, i64) = (0, 43_200);
pub const RETENTION: (i64, i64) = (60, 1_209_600);
pub const WAIT: (i64, i64) = (0, 20);
pub const DELAY: (i64, i64) = (0, 900);
pub const MAX_RECEIVE: (i64, i64) = (1, 1000);
const MAX_NAME: usize = 80;
const DLQ_SUFFIX: &str = "-dlq";

/// The dead-letter queue's name: `<base>-dlq`, keeping FIFO's mandatory `.fifo` suffix last.
pub fn dlq_name(name: &str) -> String {
    match name.strip_suffix(".fifo") {
        Some(base) => format!("{base}{DLQ_SUFFIX}.fifo"),
        None => format!("{name}{DLQ_SUFFIX}"),
    }
}

/// Checks an SQS queue name (and that its DLQ name fits too); `fifo` is `None` when unknown.
pub fn validate_name(name: &str, fifo: Option<bool>, diags: &mut Diagnostics) {
    let p = AttrPath::attr("name");
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    if base.is_empty()
        || !base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        diags.attr_error(
            p.clone(),
            "Invalid queue name",
            format!("{name:?}: queue names use only letters, digits, '-' and '_' (plus the .fifo suffix for FIFO queues)."),
        );
    }
    if dlq_name(name).len() > MAX_NAME {
        diags.attr_error(
            p.clone(),
            "Queue name too long",
            format!("{name:?} is too long: the dead-letter queue {:?} must fit the SQS limit of {MAX_NAME} characters.", dlq_name(name)),
        );
    }
    match (fifo, name.ends_with(".fifo")) {
        (Some(true), false) => diags.attr_error(p, "Invalid FIFO queue name", format!("FIFO queue names must end in \".fifo\"; got {name:?}.")),
        (Some(false), true) => diags.attr_error(p, "Invalid queue name", format!("{name:?} ends in \".fifo\" but `fifo` is false; only FIFO queues may use that suffix.")),
        _ => {}
    }
}

fn schema_block() -> Block {
    Block::new("An SQS work queue and its dead-letter queue. Messages received `max_receive_count` times without being deleted move to the dead-letter queue, named `<name>-dlq` (`<base>-dlq.fifo` for FIFO queues).")
        .attr(Attribute::string("id").computed().describe("The queue URL."))
        .attr(Attribute::string("name").required().force_new().describe("Queue name. FIFO queue names end in `.fifo`. Changing it replaces both queues."))
        .attr(Attribute::bool("fifo").default(Value::Bool(false)).force_new().describe("Create FIFO queues (ordered, exactly-once). Changing it replaces both queues."))
        .attr(Attribute::bool("content_based_deduplication").default(Value::Bool(false)).describe("FIFO only: deduplicate on a SHA-256 of the body."))
        .attr(
            Attribute::number("visibility_timeout_seconds")
                .default(Value::int(30))
                .validate(Validator::IntRange(VISIBILITY.0, VISIBILITY.1))
                .describe("Seconds a received message stays hidden, 0-43200."),
        )
        .attr(
            Attribute::number("message_retention_seconds")
                .default(Value::int(345_600))
                .validate(Validator::IntRange(RETENTION.0, RETENTION.1))
                .describe("Seconds a message is kept, 60-1209600 (14 days)."),
        )
        .attr(
            Attribute::number("receive_wait_time_seconds")
                .default(Value::int(0))
                .validate(Validator::IntRange(WAIT.0, WAIT.1))
                .describe("Long-poll wait for ReceiveMessage, 0-20."),
        )
        .attr(
            Attribute::number("delay_seconds")
                .default(Value::int(0))
                .validate(Validator::IntRange(DELAY.0, DELAY.1))
                .describe("Delivery delay for new messages, 0-900."),
        )
        .attr(Attribute::string("kms_master_key_id").optional().describe("KMS key (id, ARN or alias) for server-side encryption of both queues. Unset = SQS-managed encryption."))
        .attr(
            Attribute::number("max_receive_count")
                .default(Value::int(5))
                .validate(Validator::IntRange(MAX_RECEIVE.0, MAX_RECEIVE.1))
                .describe("Receives before a message moves to the dead-letter queue, 1-1000."),
        )
        .attr(
            Attribute::number("dlq_message_retention_seconds")
                .default(Value::int(1_209_600))
                .validate(Validator::IntRange(RETENTION.0, RETENTION.1))
                .describe("Retention of the dead-letter queue, 60-1209600."),
        )
        .attr(Attribute::string_map("tags").optional().describe("Tags for both queues."))
        .attr(Attribute::string("url").computed().describe("Queue URL."))
        .attr(Attribute::string("arn").computed().describe("Queue ARN."))
        .attr(Attribute::string("dlq_name").computed().describe("Dead-letter queue name."))
        .attr(Attribute::string("dlq_url").computed().describe("Dead-letter queue URL."))
        .attr(Attribute::string("dlq_arn").computed().describe("Dead-letter queue ARN."))
}

/// True for the errors SQS returns for a queue that does not exist (JSON and query protocol).
pub fn is_missing<E: ProvideErrorMetadata>(e: &E) -> bool {
    matches!(
        e.code(),
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}

fn int(v: &Value, name: &str) -> i64 {
    v.get(name).as_i64().unwrap_or(0)
}

/// The configured KMS key for both queues; `""` (SQS-managed encryption) when unset.
fn kms_key_id(planned: &Value) -> String {
    planned
        .get("kms_master_key_id")
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Attributes of the main queue that come from configuration (without RedrivePolicy).
fn main_attributes(planned: &Value) -> HashMap<A, String> {
    let mut m = HashMap::from([
        (
            A::VisibilityTimeout,
            int(planned, "visibility_timeout_seconds").to_string(),
        ),
        (
            A::MessageRetentionPeriod,
            int(planned, "message_retention_seconds").to_string(),
        ),
        (
            A::ReceiveMessageWaitTimeSeconds,
            int(planned, "receive_wait_time_seconds").to_string(),
        ),
        (A::DelaySeconds, int(planned, "delay_seconds").to_string()),
        (A::KmsMasterKeyId, kms_key_id(planned)),
    ]);
    if planned.get("fifo").as_bool() == Some(true) {
        m.insert(
            A::ContentBasedDeduplication,
            planned
                .get("content_based_deduplication")
                .as_bool()
                .unwrap_or(false)
                .to_string(),
        );
    }
    m
}

/// Attributes of the dead-letter queue, from configuration.
fn dlq_attributes(planned: &Value) -> HashMap<A, String> {
    let mut m = HashMap::from([
        (
            A::MessageRetentionPeriod,
            int(planned, "dlq_message_retention_seconds").to_string(),
        ),
        (A::KmsMasterKeyId, kms_key_id(planned)),
    ]);
    if planned.get("fifo").as_bool() == Some(true) {
        m.insert(A::FifoQueue, "true".into());
    }
    m
}

/// `kms_master_key_id` as read back: a queue without a CMK reads back in the form the prior
/// state used for "none" (`""`, a common module default, or null), so neither plans a diff.
pub fn kms_key_value(actual: Option<&String>, prior: &Value) -> Value {
    match actual.filter(|k| !k.is_empty()) {
        Some(k) => Value::String(k.clone()),
        None if prior.as_str() == Some("") => Value::string(""),
        None => Value::Null,
    }
}

fn redrive(dlq_arn: &str, max_receive: i64) -> String {
    serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive })
        .to_string()
}

/// Everything read back about one queue.
pub struct Observed {
    pub url: String,
    pub attrs: HashMap<A, String>,
    pub tags: BTreeMap<String, String>,
}

impl Observed {
    pub fn num(&self, a: A) -> Option<i64> {
        self.attrs.get(&a).and_then(|v| v.parse().ok())
    }
    pub fn flag(&self, a: A) -> bool {
        self.attrs.get(&a).is_some_and(|v| v == "true")
    }
    /// (dead-letter target ARN, maxReceiveCount) from the RedrivePolicy JSON.
    pub fn redrive(&self) -> Option<(String, i64)> {
        let j: serde_json::Value = serde_json::from_str(self.attrs.get(&A::RedrivePolicy)?).ok()?;
        let arn = j.get("deadLetterTargetArn")?.as_str()?.to_string();
        // SQS has returned maxReceiveCount both as a number and as a string.
        let n = match j.get("maxReceiveCount")? {
            serde_json::Value::Number(n) => n.as_i64()?,
            serde_json::Value::String(s) => s.parse().ok()?,
            _ => return None,
        };
        Some((arn, n))
    }
}

/// Reads a queue's attributes and tags; `None` if it does not exist.
pub async fn observe(c: &Client, url: &str, what: &str) -> Result<Option<Observed>, Diagnostics> {
    let attrs = match c
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::All)
        .send()
        .await
    {
        Ok(o) => o.attributes.unwrap_or_default(),
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(aws::diag(&e, what, "sqs:GetQueueAttributes")),
    };
    let tags = match c.list_queue_tags().queue_url(url).send().await {
        Ok(o) => o.tags.unwrap_or_default().into_iter().collect(),
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(aws::diag(&e, what, "sqs:ListQueueTags")),
    };
    Ok(Some(Observed {
        url: url.to_string(),
        attrs,
        tags,
    }))
}

/// Looks a queue URL up by name; `None` if there is no such queue.
pub async fn url_for(c: &Client, name: &str, what: &str) -> Result<Option<String>, Diagnostics> {
    match c.get_queue_url().queue_name(name).send().await {
        Ok(o) => Ok(o.queue_url),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(aws::diag(&e, what, "sqs:GetQueueUrl")),
    }
}

async fn create_one(
    c: &Client,
    name: &str,
    attrs: HashMap<A, String>,
    tags: &BTreeMap<String, String>,
    what: &str,
) -> Result<(String, String), Diagnostics> {
    let mut req = c
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attrs));
    if !tags.is_empty() {
        req = req.set_tags(Some(tags.clone().into_iter().collect()));
    }
    let url = req
        .send()
        .await
        .map_err(|e| aws::diag(&e, what, "sqs:CreateQueue"))?
        .queue_url
        .ok_or_else(|| {
            Diagnostics::single(
                format!("sqs:CreateQueue returned no URL for {what}"),
                "The SQS endpoint answered without a queue URL.",
            )
        })?;
    let arn = c
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(A::QueueArn)
        .send()
        .await
        .map_err(|e| aws::diag(&e, what, "sqs:GetQueueAttributes"))?
        .attributes
        .and_then(|mut a| a.remove(&A::QueueArn))
        .unwrap_or_default();
    Ok((url, arn))
}

async fn set_tags(
    c: &Client,
    url: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    what: &str,
) -> Result<(), Diagnostics> {
    let (removed, set) = tag_diff(old, new);
    if !removed.is_empty() {
        c.untag_queue()
            .queue_url(url)
            .set_tag_keys(Some(removed))
            .send()
            .await
            .map_err(|e| aws::diag(&e, what, "sqs:UntagQueue"))?;
    }
    if !set.is_empty() {
        c.tag_queue()
            .queue_url(url)
            .set_tags(Some(set.into_iter().collect()))
            .send()
            .await
            .map_err(|e| aws::diag(&e, what, "sqs:TagQueue"))?;
    }
    Ok(())
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("name").as_str())
}

#[async_trait]
impl Resource<ProviderData> for Queue {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: schema_block(),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        let fifo = match config.get("fifo") {
            Value::Bool(b) => Some(*b),
            Value::Null => Some(false),
            _ => None,
        };
        if let Some(name) = config.get("name").as_str() {
            validate_name(name, fifo, diags);
        }
        validate_tags(config, diags);
        if config.get("content_based_deduplication").as_bool() == Some(true) && fifo == Some(false)
        {
            diags.attr_error(
                AttrPath::attr("content_based_deduplication"),
                "Only for FIFO queues",
                "content_based_deduplication can only be enabled when fifo = true.",
            );
        }
    }

    fn modify_plan(
        &self,
        prior: &Value,
        planned: &mut Value,
        _config: &Value,
        _diags: &mut Diagnostics,
    ) {
        // The DLQ name follows from the name, so plan it as known rather than "(known after apply)".
        if let Some(n) = planned.get("name").as_str() {
            let d = dlq_name(n);
            planned.set("dlq_name", Value::String(d));
        }
        // Read found the DLQ gone while the queue stays: apply recreates it (an in-place update),
        // so its URL and ARN are only known after apply.
        if !prior.is_null() && prior.get("dlq_url").is_null() {
            planned.set("dlq_url", Value::UNKNOWN);
            planned.set("dlq_arn", Value::UNKNOWN);
        }
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        let c = data.sqs().await;
        let w = what(planned);
        let name = planned.get("name").as_str().unwrap_or_default().to_string();
        let fifo = planned.get("fifo").as_bool() == Some(true);
        let tags = planned.get("tags").as_string_map();
        let dlq = dlq_name(&name);
        let (dlq_url, dlq_arn) = create_one(c, &dlq, dlq_attributes(planned), &tags, &w).await?;

        let mut attrs = main_attributes(planned);
        if fifo {
            attrs.insert(A::FifoQueue, "true".into());
        }
        attrs.insert(
            A::RedrivePolicy,
            redrive(&dlq_arn, int(planned, "max_receive_count")),
        );
        let (url, arn) = match create_one(c, &name, attrs, &tags, &w).await {
            Ok(v) => v,
            Err(d) => {
                // Do not leave an orphaned DLQ behind that nothing in state tracks.
                let _ = c.delete_queue().queue_url(&dlq_url).send().await;
                return Err(d);
            }
        };
        tracing::info!(queue = %name, %url, "created queue and dead-letter queue");

        let mut state = planned.clone();
        state.set("id", Value::String(url.clone()));
        state.set("url", Value::String(url));
        state.set("arn", Value::String(arn));
        state.set("dlq_name", Value::String(dlq));
        state.set("dlq_url", Value::String(dlq_url));
        state.set("dlq_arn", Value::String(dlq_arn));
        Ok(state)
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let c = data.sqs().await;
        let w = what(state);
        let url = match state.get("url").as_str().or(state.get("id").as_str()) {
            Some(u) => u.to_string(),
            // Imported by name: find the URL first.
            None => match state.get("name").as_str() {
                Some(n) => match url_for(c, n, &w).await? {
                    Some(u) => u,
                    None => return Ok(None),
                },
                None => return Ok(None),
            },
        };
        let Some(q) = observe(c, &url, &w).await? else {
            tracing::info!(%url, "queue no longer exists");
            return Ok(None);
        };
        let name = url.rsplit('/').next().unwrap_or_default().to_string();
        let fifo = q.flag(A::FifoQueue);
        let mut s = state.clone();
        if !matches!(s, Value::Object(_)) {
            s = Value::Object(BTreeMap::new());
        }
        s.set("id", Value::String(url.clone()));
        s.set("url", Value::String(url.clone()));
        s.set("name", Value::String(name.clone()));
        s.set("fifo", Value::Bool(fifo));
        s.set(
            "content_based_deduplication",
            Value::Bool(q.flag(A::ContentBasedDeduplication)),
        );
        for (attr, a) in [
            ("visibility_timeout_seconds", A::VisibilityTimeout),
            ("message_retention_seconds", A::MessageRetentionPeriod),
            (
                "receive_wait_time_seconds",
                A::ReceiveMessageWaitTimeSeconds,
            ),
            ("delay_seconds", A::DelaySeconds),
        ] {
            if let Some(n) = q.num(a) {
                s.set(attr, Value::int(n));
            }
        }
        s.set(
            "kms_master_key_id",
            kms_key_value(
                q.attrs.get(&A::KmsMasterKeyId),
                state.get("kms_master_key_id"),
            ),
        );
        s.set("arn", Value::opt_string(q.attrs.get(&A::QueueArn).cloned()));
        s.set("tags", tags_value(q.tags.clone(), state.get("tags")));

        let dlq = dlq_name(&name);
        s.set("dlq_name", Value::String(dlq.clone()));
        let dlq_q = match url_for(c, &dlq, &w).await? {
            Some(dlq_url) => observe(c, &dlq_url, &w).await?,
            None => None,
        };
        let dlq_arn = match &dlq_q {
            Some(d) => {
                if let Some(n) = d.num(A::MessageRetentionPeriod) {
                    s.set("dlq_message_retention_seconds", Value::int(n));
                }
                s.set("dlq_url", Value::String(d.url.clone()));
                d.attrs.get(&A::QueueArn).cloned()
            }
            None => {
                // The queue stays, so the resource does too, with its DLQ missing: the plan is an
                // in-place update that recreates the DLQ (see modify_plan).
                tracing::info!(dlq = %dlq, "dead-letter queue no longer exists");
                s.set("dlq_url", Value::Null);
                None
            }
        };
        s.set("dlq_arn", Value::opt_string(dlq_arn.clone()));
        match q.redrive() {
            Some((target, n)) if Some(&target) == dlq_arn.as_ref() => {
                s.set("max_receive_count", Value::int(n));
            }
            // The redrive was removed, or targets something other than this resource's DLQ
            // (a deleted DLQ's stale ARN included): a null count plans the repair.
            _ => s.set("max_receive_count", Value::Null),
        }
        Ok(Some(s))
    }

    async fn update(
        &self,
        data: &ProviderData,
        prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        let c = data.sqs().await;
        let w = what(planned);
        let url = prior.get("url").as_str().unwrap_or_default().to_string();
        let tags = planned.get("tags").as_string_map();
        let existing_dlq = prior
            .get("dlq_url")
            .as_str()
            .zip(prior.get("dlq_arn").as_str())
            .map(|(u, a)| (u.to_string(), a.to_string()));
        let dlq_recreated = existing_dlq.is_none();
        let (dlq_url, dlq_arn) = match existing_dlq {
            Some(d) => d,
            None => {
                let dlq = dlq_name(planned.get("name").as_str().unwrap_or_default());
                let d = create_one(c, &dlq, dlq_attributes(planned), &tags, &w).await?;
                tracing::info!(%dlq, "recreated the dead-letter queue deleted out of band");
                d
            }
        };

        let old = main_attributes(prior);
        let mut changed: HashMap<A, String> = main_attributes(planned)
            .into_iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .collect();
        // Read nulls max_receive_count when the redrive is missing or stale, so this also
        // repairs a redrive removed out of band, always towards the DLQ's real ARN.
        if dlq_recreated || prior.get("max_receive_count") != planned.get("max_receive_count") {
            changed.insert(
                A::RedrivePolicy,
                redrive(&dlq_arn, int(planned, "max_receive_count")),
            );
        }
        if !changed.is_empty() {
            c.set_queue_attributes()
                .queue_url(&url)
                .set_attributes(Some(changed))
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "sqs:SetQueueAttributes"))?;
        }
        let old_tags = prior.get("tags").as_string_map();
        if !dlq_recreated {
            // A recreated DLQ already has the planned attributes and tags.
            let old = dlq_attributes(prior);
            let dlq_changed: HashMap<A, String> = dlq_attributes(planned)
                .into_iter()
                .filter(|(k, v)| old.get(k) != Some(v))
                .collect();
            if !dlq_changed.is_empty() {
                c.set_queue_attributes()
                    .queue_url(&dlq_url)
                    .set_attributes(Some(dlq_changed))
                    .send()
                    .await
                    .map_err(|e| aws::diag(&e, &w, "sqs:SetQueueAttributes"))?;
            }
            set_tags(c, &dlq_url, &old_tags, &tags, &w).await?;
        }
        set_tags(c, &url, &old_tags, &tags, &w).await?;
        let mut state = planned.clone();
        state.set("dlq_url", Value::String(dlq_url));
        state.set("dlq_arn", Value::String(dlq_arn));
        Ok(state)
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let c = data.sqs().await;
        let w = what(state);
        for key in ["url", "dlq_url"] {
            let Some(url) = state.get(key).as_str() else {
                continue;
            };
            match c.delete_queue().queue_url(url).send().await {
                Ok(_) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(aws::diag(&e, &w, "sqs:DeleteQueue")),
            }
        }
        Ok(())
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        // Accept a queue URL or a bare name.
        let mut m = BTreeMap::new();
        if id.starts_with("http://") || id.starts_with("https://") {
            m.insert("url".to_string(), Value::string(id));
            m.insert(
                "name".to_string(),
                Value::string(id.rsplit('/').next().unwrap_or_default()),
            );
        } else {
            let mut d = Diagnostics::new();
            validate_name(id, None, &mut d);
            if d.has_errors() {
                return Err(Diagnostics::single(
                    "Invalid import ID",
                    format!("{id:?} is neither a queue URL nor a valid queue name."),
                ));
            }
            m.insert("name".to_string(), Value::string(id));
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlq_names() {
        assert_eq!(dlq_name("jobs"), "jobs-dlq");
        assert_eq!(dlq_name("jobs.fifo"), "jobs-dlq.fifo");
    }

    fn names(name: &str, fifo: Option<bool>) -> Vec<String> {
        let mut d = Diagnostics::new();
        validate_name(name, fifo, &mut d);
        d.0.into_iter().map(|d| d.summary).collect()
    }

    #[test]
    fn fifo_naming_rule() {
        assert!(names("jobs.fifo", Some(true)).is_empty());
        assert_eq!(names("jobs", Some(true)), vec!["Invalid FIFO queue name"]);
        assert_eq!(names("jobs.fifo", Some(false)), vec!["Invalid queue name"]);
        assert!(names("jobs", None).is_empty());
        assert_eq!(names("bad name", Some(false)), vec!["Invalid queue name"]);
        assert_eq!(
            names(&"a".repeat(78), Some(false)),
            vec!["Queue name too long"]
        );
    }

    #[test]
    fn redrive_parses_both_number_forms() {
        let mk = |json: &str| Observed {
            url: String::new(),
            attrs: HashMap::from([(A::RedrivePolicy, json.to_string())]),
            tags: BTreeMap::new(),
        };
        assert_eq!(
            mk(&redrive("arn:x", 5)).redrive(),
            Some(("arn:x".into(), 5))
        );
        assert_eq!(
            mk(r#"{"deadLetterTargetArn":"arn:y","maxReceiveCount":"7"}"#).redrive(),
            Some(("arn:y".into(), 7))
        );
    }

    #[test]
    fn no_cmk_reads_back_in_the_prior_form() {
        let arn = "arn:aws:kms:us-east-1:1:key/k".to_string();
        let empty = String::new();
        assert_eq!(
            kms_key_value(Some(&arn), &Value::string("")),
            Value::String(arn.clone())
        );
        assert_eq!(
            kms_key_value(Some(&empty), &Value::string("")),
            Value::string("")
        );
        assert_eq!(kms_key_value(None, &Value::string("")), Value::string(""));
        assert_eq!(kms_key_value(Some(&empty), &Value::Null), Value::Null);
        assert_eq!(kms_key_value(None, &Value::string(arn)), Value::Null);
    }

    #[test]
    fn a_missing_dlq_plans_its_url_and_arn_unknown() {
        let obj = |pairs: &[(&str, Value)]| {
            Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            )
        };
        let planned_for = |prior: &Value| {
            let mut planned = obj(&[
                ("name", Value::string("jobs")),
                ("dlq_url", prior.get("dlq_url").clone()),
                ("dlq_arn", prior.get("dlq_arn").clone()),
            ]);
            Queue.modify_plan(prior, &mut planned, &Value::Null, &mut Diagnostics::new());
            planned
        };
        let present = obj(&[
            ("dlq_url", Value::string("http://q/jobs-dlq")),
            ("dlq_arn", Value::string("arn:aws:sqs:r:1:jobs-dlq")),
        ]);
        assert_eq!(planned_for(&present).get("dlq_url"), present.get("dlq_url"));
        assert_eq!(planned_for(&present).get("dlq_arn"), present.get("dlq_arn"));
        let missing = obj(&[("dlq_url", Value::Null), ("dlq_arn", Value::Null)]);
        assert!(planned_for(&missing).get("dlq_url").is_unknown());
        assert!(planned_for(&missing).get("dlq_arn").is_unknown());
        assert_eq!(
            planned_for(&missing).get("dlq_name"),
            &Value::string("jobs-dlq")
        );
    }

    #[test]
    fn import_accepts_url_or_name() {
        let v = Queue
            .import_state("http://127.0.0.1:5000/123456789012/jobs")
            .unwrap();
        assert_eq!(v.get("name"), &Value::string("jobs"));
        assert!(Queue.import_state("jobs").is_ok());
        assert!(Queue.import_state("not a name").is_err());
    }
}
