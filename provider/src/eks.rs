//! Shared pieces of the EKS resources (`agentplane_cluster`, `agentplane_gpu_node_pool`):
//! EKS error classification, waiting for EKS's asynchronous operations, and the value
//! helpers both resources need (string sets, names, ARNs, timeouts).
//!
//! EKS answers CreateCluster/CreateNodegroup/Update*/Delete* at once and finishes the work in
//! the background (a cluster takes ~10 minutes, a node group a few). The resources therefore
//! poll until the object reaches the state the plan promised (ACTIVE, or gone), bounded by the
//! resource's `wait_timeout_seconds`.

use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_eks::Client;
use aws_sdk_eks::error::ProvideErrorMetadata;
use aws_sdk_eks::primitives::{DateTime, DateTimeFormat};
use aws_sdk_eks::types::{Update, UpdateStatus};

use crate::aws;
use crate::framework::{Attribute, Diagnostics, Type, Value};

/// Default for `wait_timeout_seconds` (20 minutes: a cluster usually takes 10-15).
pub const DEFAULT_WAIT_SECONDS: i64 = 1200;
/// Allowed `wait_timeout_seconds`: one second to one day.
pub const WAIT_SECONDS: (i64, i64) = (1, 86_400);

/// First pause between two polls. Short, so an emulator that is done at once (moto) costs
/// almost nothing; doubled after every poll up to [`MAX_POLL_DELAY`].
const FIRST_POLL_DELAY: Duration = Duration::from_millis(500);
/// Longest pause between two polls: EKS operations take minutes, and DescribeCluster and
/// DescribeNodegroup are rate limited per account.
const MAX_POLL_DELAY: Duration = Duration::from_secs(15);

/// True for the error EKS returns for a cluster, node group or update that does not exist.
pub fn is_not_found<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ResourceNotFoundException")
}

/// True for EKS's "busy" answer (an object with attached children, or an update in flight).
pub fn is_in_use<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ResourceInUseException")
}

/// What one poll saw.
#[derive(Debug)]
pub enum Progress<T> {
    /// The goal is reached.
    Done(T),
    /// Not yet; the text is the status seen (for the timeout message).
    Waiting(String),
}

/// Polls `poll` (at once, then with growing pauses) until it reports [`Progress::Done`], fails,
/// or `timeout` passes. `what` names the object, `goal` the awaited state and `hint` tells
/// the user what to do about a timeout (the object still exists in AWS).
pub async fn wait_for<T, F, Fut>(
    timeout: Duration,
    what: &str,
    goal: &str,
    hint: &str,
    mut poll: F,
) -> Result<T, Diagnostics>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Progress<T>, Diagnostics>>,
{
    let start = Instant::now();
    let mut delay = FIRST_POLL_DELAY;
    loop {
        let status = match poll().await? {
            Progress::Done(v) => return Ok(v),
            Progress::Waiting(s) => s,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(Diagnostics::single(
                format!("Timed out waiting for {what}"),
                format!(
                    "{what} was still {status} after {} s, waiting for it to be {goal} (wait_timeout_seconds = {}). {hint}",
                    elapsed.as_secs(),
                    timeout.as_secs()
                ),
            ));
        }
        tracing::debug!(%what, %status, %goal, "waiting");
        tokio::time::sleep(delay.min(timeout - elapsed)).await;
        delay = (delay * 2).min(MAX_POLL_DELAY);
    }
}

/// Waits for an EKS update (UpdateClusterVersion, UpdateClusterConfig, UpdateNodegroupConfig)
/// to finish. `update` is what the call returned: an update already `Successful` needs no
/// wait, and a missing update object (moto's UpdateClusterConfig answers without one) leaves
/// the caller's wait for ACTIVE to cover it.
pub async fn wait_update(
    c: &Client,
    cluster: &str,
    nodegroup: Option<&str>,
    update: Option<&Update>,
    timeout: Duration,
    what: &str,
) -> Result<(), Diagnostics> {
    let Some(update) = update else {
        return Ok(());
    };
    if let Some(done) = update_outcome(update, what) {
        return done;
    }
    let Some(id) = update.id() else {
        return Ok(());
    };
    wait_for(
        timeout,
        &format!("update {id} of {what}"),
        "Successful",
        "The update goes on in AWS; run apply again once it has finished.",
        || async move {
            let mut req = c.describe_update().name(cluster).update_id(id);
            if let Some(ng) = nodegroup {
                req = req.nodegroup_name(ng);
            }
            let out = req
                .send()
                .await
                .map_err(|e| aws::diag(&e, what, "eks:DescribeUpdate"))?;
            let Some(u) = out.update else {
                return Ok(Progress::Done(()));
            };
            match update_outcome(&u, what) {
                Some(done) => done.map(Progress::Done),
                None => Ok(Progress::Waiting(
                    u.status().map_or("InProgress", |s| s.as_str()).to_string(),
                )),
            }
        },
    )
    .await
}

/// `Some` once an update has finished (successfully or not), `None` while it runs.
fn update_outcome(u: &Update, what: &str) -> Option<Result<(), Diagnostics>> {
    match u.status() {
        Some(UpdateStatus::Successful) => Some(Ok(())),
        Some(s @ (UpdateStatus::Failed | UpdateStatus::Cancelled)) => {
            let errors: Vec<String> = u
                .errors()
                .iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.error_code().map_or("Error", |c| c.as_str()),
                        e.error_message().unwrap_or("")
                    )
                })
                .collect();
            Some(Err(Diagnostics::single(
                format!("EKS update of {what} {}", s.as_str().to_lowercase()),
                format!(
                    "Update {} ended {}: {}",
                    u.id().unwrap_or("?"),
                    s.as_str(),
                    if errors.is_empty() {
                        "EKS gave no reason.".to_string()
                    } else {
                        errors.join("; ")
                    }
                ),
            )))
        }
        _ => None,
    }
}

/// `wait_timeout_seconds` of a planned or stored value, with the default for null.
pub fn wait_timeout(v: &Value) -> Duration {
    let secs = v
        .get("wait_timeout_seconds")
        .as_i64()
        .unwrap_or(DEFAULT_WAIT_SECONDS)
        .clamp(WAIT_SECONDS.0, WAIT_SECONDS.1);
    Duration::from_secs(secs as u64)
}

/// An attribute of any type (the schema builders only name the scalar ones).
pub fn typed(name: &'static str, ty: Type) -> Attribute {
    let mut a = Attribute::string(name);
    a.ty = ty;
    a
}

/// The strings of a list or set value (unknown/null → empty, non-strings skipped).
pub fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::List(items) | Value::Set(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// A set of strings in the order Terraform keeps string sets (sorted, no duplicates).
pub fn string_set(mut items: Vec<String>) -> Value {
    items.sort();
    items.dedup();
    Value::Set(items.into_iter().map(Value::String).collect())
}

/// A set read back from AWS where "none" is an empty answer: shown in the form the prior
/// state used (`[]` stays `[]`, anything else becomes null), so an unset optional set does
/// not plan a `null -> []` diff.
pub fn optional_set(items: Vec<String>, prior: &Value) -> Value {
    if items.is_empty() {
        return match prior {
            Value::Set(v) | Value::List(v) if v.is_empty() => prior.clone(),
            _ => Value::Null,
        };
    }
    string_set(items)
}

/// True when two list/set values hold the same strings, whatever the order.
pub fn same_strings(a: &Value, b: &Value) -> bool {
    let (mut x, mut y) = (strings(a), strings(b));
    x.sort();
    y.sort();
    x == y
}

/// The planned value with every unknown top-level attribute taken from `observed`: the apply
/// result must equal the plan wherever the plan was known.
pub fn fill_unknown(planned: &Value, observed: &Value) -> Value {
    let mut out = planned.clone();
    if let Value::Object(m) = planned {
        for (k, v) in m {
            if v.is_unknown() {
                out.set(k, observed.get(k).clone());
            }
        }
    }
    out
}

/// RFC 3339 text of an AWS timestamp.
pub fn timestamp(t: Option<&DateTime>) -> Value {
    Value::opt_string(t.and_then(|t| t.fmt(DateTimeFormat::DateTime).ok()))
}

/// EKS cluster and node group names: 1-`max` characters, letters, digits, '-' and '_',
/// starting with a letter or digit.
pub fn valid_name(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.chars().count() <= max
        && first.is_ascii_alphanumeric()
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An IAM role ARN: `arn:<partition>:iam::<12-digit account>:role/<path/name>`.
pub fn valid_role_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    matches!(
        parts.as_slice(),
        ["arn", partition, "iam", "", account, resource]
            if !partition.is_empty()
                && account.len() == 12
                && account.chars().all(|c| c.is_ascii_digit())
                && resource.strip_prefix("role/").is_some_and(|r| !r.is_empty())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("gpu-pool_1", 63));
        assert!(!valid_name("", 63));
        assert!(!valid_name("-pool", 63));
        assert!(!valid_name("pool.x", 63));
        assert!(!valid_name(&"a".repeat(64), 63));
    }

    #[test]
    fn role_arns() {
        assert!(valid_role_arn("arn:aws:iam::123456789012:role/eks"));
        assert!(valid_role_arn(
            "arn:aws-cn:iam::123456789012:role/path/eks-node"
        ));
        assert!(!valid_role_arn("arn:aws:iam::123456789012:user/eks"));
        assert!(!valid_role_arn("arn:aws:iam::12345:role/eks"));
        assert!(!valid_role_arn("eks-role"));
        assert!(!valid_role_arn("arn:aws:iam::123456789012:role/"));
    }

    #[test]
    fn sets_are_sorted_and_follow_prior_emptiness() {
        assert_eq!(
            string_set(vec!["b".into(), "a".into(), "b".into()]),
            Value::Set(vec![Value::string("a"), Value::string("b")])
        );
        assert_eq!(optional_set(vec![], &Value::Null), Value::Null);
        let empty = Value::Set(vec![]);
        assert_eq!(optional_set(vec![], &empty), empty);
        assert!(same_strings(
            &Value::List(vec![Value::string("x"), Value::string("y")]),
            &Value::Set(vec![Value::string("y"), Value::string("x")])
        ));
    }

    #[test]
    fn fill_unknown_keeps_known_values() {
        let planned = Value::Object(
            [
                ("a".to_string(), Value::UNKNOWN),
                ("b".to_string(), Value::string("plan")),
            ]
            .into(),
        );
        let observed = Value::Object(
            [
                ("a".to_string(), Value::string("aws")),
                ("b".to_string(), Value::string("aws")),
            ]
            .into(),
        );
        let v = fill_unknown(&planned, &observed);
        assert_eq!(v.get("a"), &Value::string("aws"));
        assert_eq!(v.get("b"), &Value::string("plan"));
    }

    #[test]
    fn wait_timeout_defaults_and_clamps() {
        assert_eq!(wait_timeout(&Value::Null), Duration::from_secs(1200));
        let v = Value::Object([("wait_timeout_seconds".to_string(), Value::int(0))].into());
        assert_eq!(wait_timeout(&v), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn wait_for_times_out_with_last_status() {
        let err = wait_for(
            Duration::from_millis(700),
            "cluster x",
            "ACTIVE",
            "hint.",
            || async { Ok::<Progress<()>, Diagnostics>(Progress::Waiting("CREATING".into())) },
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("still CREATING"), "{text}");
        assert!(text.contains("hint."), "{text}");
    }

    #[tokio::test]
    async fn wait_for_returns_first_done() {
        let mut n = 0;
        let v = wait_for(Duration::from_secs(5), "x", "ACTIVE", "", || {
            n += 1;
            let k = n;
            async move {
                Ok::<_, Diagnostics>(if k < 2 {
                    Progress::Waiting("CREATING".into())
                } else {
                    Progress::Done(k)
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 2);
    }
}
