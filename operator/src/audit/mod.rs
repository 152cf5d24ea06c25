//! The tamper-evident audit log (DESIGN.md §2 step 7, issue 7 part 3).
//!
//! Every admission, policy decision, approval and phase transition is a leaf of an append-only Merkle
//! log (RFC 6962 hashing, [`merkle`]) kept in its own SQLite file ([`log`]). Signed checkpoints
//! ([`checkpoint`]) commit to the tree head: Ed25519 with a local key in `agentplane dev`, KMS
//! ECC_NIST_P256 in the distributed mode. [`verify`] checks a log file offline, and `agentplane audit`
//! ([`cli`]) exposes verification, inclusion proofs and export. [`AuditedStore`] wraps a task store so
//! every transition the runtime writes is recorded (the embedded runtime); in the distributed runtime
//! the operator leader records every task state it observes instead ([`observer`]), since several
//! processes write status there.
//!
//! A leaf is the canonical JSON of an [`AuditEvent`]: keys sorted, no insignificant whitespace, so the
//! same event always hashes the same way. The stored bytes are what is hashed; readers never
//! re-serialise before hashing.

pub mod audited_store;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod encoding;
pub mod log;
pub mod merkle;
pub mod observer;
mod schema;
pub mod verify;

pub use audited_store::AuditedStore;
pub use checkpoint::{
    CheckpointSigner, Ed25519Signer, KmsSigner, SignedCheckpoint, SignerError, TrustedKey,
};
pub use log::{Appended, AuditLog, AuditLogConfig, LogError};
pub use observer::{ObservedStore, TaskObserver};
pub use verify::{Problem, VerifyError, VerifyOptions, VerifyReport, verify_log};

use agentplane_api::TaskPhase;
use agentplane_api::task::AgentTaskStatus;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What an audit event records.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A phase change that is not a policy decision (queued -> running, running -> succeeded, ...).
    Transition,
    /// An approver approved or denied a task.
    Approval,
    /// A policy decision: admission control's verdict on a pending task, or a cancel request.
    Decision,
    /// The gateway stored a new task.
    Admission,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Transition => "transition",
            EventKind::Approval => "approval",
            EventKind::Decision => "decision",
            EventKind::Admission => "admission",
        }
    }
}

/// One leaf of the audit log.
///
/// The fields are declared in the byte order of their JSON names, and `details` is a
/// `serde_json::Map` (a `BTreeMap`: this workspace does not enable serde_json's `preserve_order`), so
/// serialising an event directly already gives [`canonical_json`]'s bytes without building a
/// `serde_json::Value` first — the log serialises every event it appends, on its hot path. The tests
/// below hold both facts to account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditEvent {
    /// Who caused it, when known: `device/<name>` for admissions, the approver for approvals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<TaskPhase>,
    pub kind: EventKind,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The leaf index (0-based), assigned by the log when the event is appended.
    pub seq: u64,
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<TaskPhase>,
}

impl AuditEvent {
    /// An event of `kind` about `task`, stamped now; `seq` is filled in by the log.
    pub fn new(kind: EventKind, namespace: &str, task: &str) -> Self {
        AuditEvent {
            seq: 0,
            at: Timestamp::now(),
            kind,
            task: task.to_owned(),
            namespace: namespace.to_owned(),
            from: None,
            to: None,
            reason: None,
            actor: None,
            details: serde_json::Value::Null,
        }
    }

    /// The leaf bytes: canonical JSON (see the type's comment for why direct serialisation is).
    pub fn to_leaf(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub fn from_leaf(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The leaf of a circuit-breaker trip: a `decision` (the runtime suspended the namespace), about
/// the policy rather than a task, so `task` names the policy (`agentpolicy/default`), `reason` is the
/// trip's reason and `details` its figures. Keyed by the trip's time, so a replay adds nothing.
pub fn breaker_event(
    namespace: &str,
    trip: &agentplane_api::policy::BreakerTrip,
) -> (String, AuditEvent) {
    let subject = format!("agentpolicy/{}", crate::store::sqlite::POLICY_NAME);
    let mut e = AuditEvent::new(EventKind::Decision, namespace, &subject);
    e.at = trip.tripped_at.0;
    e.actor = Some("circuit-breaker".into());
    e.reason = Some(trip.reason.clone());
    e.details = serde_json::json!({
        "suspend": true,
        "tasks": trip.tasks,
        "failures": trip.failures,
        "spendMicros": trip.spend_micros,
    });
    let key = format!(
        "{namespace}/{subject}/breaker@{}",
        trip.tripped_at.0.as_millisecond()
    );
    (key, e)
}

/// Why admission control holds a pending task (its `Admitted=False` condition's message), if it does.
/// A denial also sets `Admitted=False`, but a denied task is no longer Pending.
pub(crate) fn held_reason(status: &AgentTaskStatus) -> Option<&str> {
    if status.phase() != TaskPhase::Pending {
        return None;
    }
    status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::store::CONDITION_ADMITTED && c.status == "False")
        .map(|c| c.message.as_str())
}

/// The plan steps whose tool call the gate refused.
pub(crate) fn denied_steps(
    status: &AgentTaskStatus,
) -> impl Iterator<Item = &agentplane_api::task::PlanStep> {
    status
        .steps
        .iter()
        .filter(|s| s.outcome == agentplane_api::task::StepOutcome::Denied)
}

/// Adds the Rego verdict an admission decision was taken with (`details.rego {decision, reasons,
/// digest}`: what the modules said and which version of them said it), when the policy has Rego.
pub(crate) fn insert_rego_verdict(
    details: &mut serde_json::Map<String, serde_json::Value>,
    status: &AgentTaskStatus,
) {
    if let Some(v) = &status.rego
        && let Ok(value) = serde_json::to_value(v)
    {
        details.insert("rego".into(), value);
    }
}

/// Serialises a JSON value with object keys sorted (by bytes) and no whitespace. Numbers and strings use
/// serde_json's own formatting, which is deterministic; the audit events only carry integers.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_canonical_with_every_field_and_nested_details() {
        let mut e = AuditEvent::new(EventKind::Approval, "team-a", "t\"2");
        e.seq = u64::MAX;
        e.from = Some(TaskPhase::AwaitingApproval);
        e.to = Some(TaskPhase::Queued);
        e.reason = Some("ok \u{e9}\n".into());
        e.actor = Some("alice".into());
        // Keys inserted out of order, at two depths: a preserve_order Map would keep this order.
        let mut inner = serde_json::Map::new();
        inner.insert("z".into(), serde_json::json!(1));
        inner.insert("a".into(), serde_json::json!([{"y": 2, "b": null}]));
        let mut details = serde_json::Map::new();
        details.insert("version".into(), serde_json::json!("9"));
        details.insert("usage".into(), serde_json::Value::Object(inner));
        details.insert("decision".into(), serde_json::json!("approve"));
        e.details = serde_json::Value::Object(details);
        let leaf = e.to_leaf().unwrap();
        assert_eq!(
            String::from_utf8(leaf).unwrap(),
            canonical_json(&serde_json::to_value(&e).unwrap())
        );
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = serde_json::json!({"b": 1, "a": {"z": [3, {"y": "\"q\"", "x": null}], "c": true}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":true,"z":[3,{"x":null,"y":"\"q\""}]},"b":1}"#
        );
    }

    #[test]
    fn events_round_trip_through_their_leaf_bytes() {
        let mut e = AuditEvent::new(EventKind::Transition, "ns", "t1");
        e.seq = 7;
        e.from = Some(TaskPhase::Queued);
        e.to = Some(TaskPhase::Running);
        e.details = serde_json::json!({"version": "3"});
        let bytes = e.to_leaf().unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(r#"{"at":"#), "{text}");
        assert!(text.contains(r#""kind":"transition""#), "{text}");
        assert!(
            !text.contains("reason"),
            "absent fields are omitted: {text}"
        );
        assert_eq!(AuditEvent::from_leaf(&bytes).unwrap(), e);
        // Direct serialisation is the canonical form.
        assert_eq!(
            canonical_json(&serde_json::to_value(&e).unwrap()).into_bytes(),
            bytes
        );
        // The same event always gives the same bytes.
        assert_eq!(e.clone().to_leaf().unwrap(), bytes);
        // Unknown fields are refused, so a leaf cannot smuggle data past the reader.
        assert!(AuditEvent::from_leaf(br#"{"seq":1,"extra":1}"#).is_err());
    }
}
