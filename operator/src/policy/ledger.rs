//! The governance ledger: in-memory counters that rate limits and budgets are decided against.
//!
//! It holds, per admitted task, *when* it was admitted and *what it costs*:
//! - rate windows: for each (intent type, scope, scope key) the admission times inside the longest
//!   rate-limit period ([`MAX_WINDOW`]), sorted, so a sliding-window log can count them exactly;
//! - charges and spend: each admitted task's amount (its estimate while in flight, its real cost once
//!   it succeeded, 0 once it ended otherwise) summed per (scope, key, budget period, period start).
//!
//! The ledger is a pure data structure (no I/O, time passed in) so `policy::evaluate` stays a pure
//! function. The controller owns one: it is rebuilt from the store when the controller starts
//! ([`Ledger::rebuild`] over `TaskStore::list_tasks`), updated by the controller right after each
//! admission it writes ([`Ledger::record_admission`]), and fed every task change event
//! ([`Ledger::observe`]) so that a task's estimate is replaced by its cost when it succeeds.
//!
//! What makes the rebuild possible is that the controller records each admission in the task's status
//! as an `Admitted=True` condition whose `lastTransitionTime` is the admission time. That time is
//! stored with whole-second precision (Kubernetes `Time`), so a rebuilt rate window counts a task from
//! the *end* of its stored second: never earlier than the real admission, so a restart can delay the
//! next admission by under a second but never let one through early.

use std::collections::{HashMap, VecDeque};

use agentplane_api::IntentPayload;
use agentplane_api::policy::{AgentPolicySpec, BudgetPeriod, Scope};
use agentplane_api::task::AgentTaskStatus;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::budget::{self, PERIODS, period_start};
use crate::store::TaskRecord;

/// Condition type recording the policy's admission decision (`True` = admitted at its
/// `lastTransitionTime`; `False` = held, with the reason).
pub const ADMITTED_CONDITION: &str = "Admitted";

/// Longest rate-limit period (the CRD allows up to 31 days; longer periods are clamped to this).
pub const MAX_WINDOW: SignedDuration = SignedDuration::from_hours(31 * 24);

/// How long charges and per-period sums are kept: a month is at most 31 days and an ISO week that
/// began in the previous month at most 6 days more, so 38 days covers every current period.
pub const SPEND_HORIZON: SignedDuration = SignedDuration::from_hours(38 * 24);

const ALL_SCOPES: [Scope; 3] = [Scope::User, Scope::Device, Scope::Namespace];

/// Whom a task counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    pub intent: &'a str,
    pub user: &'a str,
    pub device: &'a str,
}

impl<'a> Subject<'a> {
    pub fn of(payload: &'a IntentPayload) -> Self {
        Subject {
            intent: &payload.intent.kind,
            user: &payload.user_id,
            device: &payload.device_id,
        }
    }

    /// From a stored task's display fields (checked against the signed payload before admission).
    pub fn of_task(task: &'a TaskRecord) -> Self {
        Subject {
            intent: &task.spec.intent_type,
            user: &task.spec.user_id,
            device: &task.spec.device_ref.name,
        }
    }

    /// The key of `scope`: the user id, the device id, or "" (one key for the namespace).
    pub fn key(&self, scope: Scope) -> &'a str {
        match scope {
            Scope::User => self.user,
            Scope::Device => self.device,
            Scope::Namespace => "",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WindowKey {
    intent: String,
    scope: Scope,
    key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SpendKey {
    scope: Scope,
    key: String,
    period: u8,
    start: Timestamp,
}

fn period_index(p: BudgetPeriod) -> u8 {
    match p {
        BudgetPeriod::Hour => 0,
        BudgetPeriod::Day => 1,
        BudgetPeriod::Week => 2,
        BudgetPeriod::Month => 3,
    }
}

#[derive(Clone, Debug)]
struct Charge {
    user: String,
    device: String,
    /// Decides which budget periods the amount falls in.
    admitted_at: Timestamp,
    amount: u64,
    /// The task is terminal: the amount is final and later events change nothing.
    settled: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Admission times in unix milliseconds, ascending.
    windows: HashMap<WindowKey, VecDeque<i64>>,
    charges: HashMap<String, Charge>,
    spend: HashMap<SpendKey, u64>,
}

/// When a stored task was admitted, if it was: (time counted in rate windows, time deciding its budget
/// periods).
fn recorded_admission(task: &TaskRecord) -> Option<(i64, Timestamp)> {
    match admitted_condition(&task.status) {
        Some(at) => {
            // Stored to the second, truncated: count it from the end of that second (see module docs).
            let window = at.as_millisecond().saturating_add(1000);
            Some((window, at))
        }
        // Admitted before admissions were recorded (status.model is only written at admission):
        // the creation time is the best record there is.
        None if task.status.model.is_some()
            && !matches!(
                task.phase(),
                agentplane_api::TaskPhase::Pending | agentplane_api::TaskPhase::Denied
            ) =>
        {
            Some((task.created_at.as_millisecond(), task.created_at))
        }
        None => None,
    }
}

/// The `lastTransitionTime` of an `Admitted=True` condition.
pub fn admitted_condition(status: &AgentTaskStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == ADMITTED_CONDITION && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// An `Admitted` condition (`True` with reason `WithinPolicy`/`ModelDowngraded`, or `False` while held).
pub fn admission_condition(
    admitted: bool,
    reason: &str,
    message: &str,
    at: Timestamp,
) -> Condition {
    Condition {
        type_: ADMITTED_CONDITION.to_owned(),
        status: if admitted { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(at),
        observed_generation: None,
    }
}

/// Replaces the condition of the same type, or appends it.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(c) => *c = condition,
        None => conditions.push(condition),
    }
}

/// What a stored, not yet finished task is expected to cost on the tier it was admitted on.
fn in_flight_estimate(task: &TaskRecord, policy: Option<&AgentPolicySpec>) -> u64 {
    let tier = task
        .status
        .model
        .as_ref()
        .and_then(|m| m.selected.as_deref())
        .and_then(|name| policy?.tier(name));
    let payload = task.spec.envelope.peek_intent().ok();
    match (tier, payload) {
        (Some((_, tier)), Some(p)) => budget::estimate_micros(tier, &p.intent),
        _ => 0,
    }
}

impl Ledger {
    /// A ledger holding every admission of `tasks` still relevant at `now`. `policy` prices the tasks
    /// still in flight (their estimate on the tier they were admitted on).
    pub fn rebuild<'a>(
        tasks: impl IntoIterator<Item = &'a TaskRecord>,
        policy: Option<&AgentPolicySpec>,
        now: Timestamp,
    ) -> Ledger {
        let mut ledger = Ledger::default();
        for t in tasks {
            ledger.observe(t, policy, now);
        }
        ledger
    }

    /// Records an admission the controller just wrote, at `at`, reserving `estimate` against the
    /// subject's budgets until the task finishes.
    pub fn record_admission(
        &mut self,
        task_id: &str,
        subject: &Subject<'_>,
        at: Timestamp,
        estimate: u64,
    ) {
        if self.charges.contains_key(task_id) {
            return;
        }
        self.insert(task_id, subject, at.as_millisecond(), at, estimate, false);
    }

    /// Brings one task's entry up to date with its stored state. Idempotent, and monotonic: a task's
    /// final amount is never replaced by an older, non-terminal state seen late.
    pub fn observe(&mut self, task: &TaskRecord, policy: Option<&AgentPolicySpec>, now: Timestamp) {
        let terminal = task.phase().is_terminal();
        let actual = task.status.usage.map_or(0, |u| u.cost_micros);
        if let Some(charge) = self.charges.get_mut(&task.id) {
            if charge.settled || !terminal {
                return;
            }
            let old = charge.amount;
            charge.amount = actual;
            charge.settled = true;
            let (user, device, at) = (
                charge.user.clone(),
                charge.device.clone(),
                charge.admitted_at,
            );
            self.adjust(&user, &device, at, old, actual);
            return;
        }
        let Some((window_ms, admitted_at)) = recorded_admission(task) else {
            return;
        };
        if admitted_at < now.checked_sub(SPEND_HORIZON).unwrap_or(Timestamp::MIN) {
            return;
        }
        let amount = if terminal {
            actual
        } else {
            in_flight_estimate(task, policy)
        };
        let subject = Subject::of_task(task);
        self.insert(&task.id, &subject, window_ms, admitted_at, amount, terminal);
    }

    fn insert(
        &mut self,
        task_id: &str,
        subject: &Subject<'_>,
        window_ms: i64,
        admitted_at: Timestamp,
        amount: u64,
        settled: bool,
    ) {
        for scope in ALL_SCOPES {
            let key = WindowKey {
                intent: subject.intent.to_owned(),
                scope,
                key: subject.key(scope).to_owned(),
            };
            let times = self.windows.entry(key).or_default();
            // Admissions arrive in time order except during a rebuild; keep the log sorted.
            if times.back().is_none_or(|last| *last <= window_ms) {
                times.push_back(window_ms);
            } else {
                let at = times.partition_point(|t| *t <= window_ms);
                times.insert(at, window_ms);
            }
        }
        self.charges.insert(
            task_id.to_owned(),
            Charge {
                user: subject.user.to_owned(),
                device: subject.device.to_owned(),
                admitted_at,
                amount,
                settled,
            },
        );
        self.adjust(subject.user, subject.device, admitted_at, 0, amount);
    }

    /// Moves a charge from `old` to `new` in every period sum it belongs to.
    fn adjust(&mut self, user: &str, device: &str, at: Timestamp, old: u64, new: u64) {
        if old == new {
            return;
        }
        let starts = PERIODS.map(|p| (period_index(p), period_start(p, at)));
        for scope in ALL_SCOPES {
            let key = match scope {
                Scope::User => user,
                Scope::Device => device,
                Scope::Namespace => "",
            };
            for (period, start) in starts {
                let sum = self
                    .spend
                    .entry(SpendKey {
                        scope,
                        key: key.to_owned(),
                        period,
                        start,
                    })
                    .or_default();
                *sum = sum.saturating_sub(old).saturating_add(new);
            }
        }
    }

    /// Admission times (unix milliseconds, ascending) of `intent` tasks for one scope key.
    pub fn window(&self, intent: &str, scope: Scope, key: &str) -> Option<&VecDeque<i64>> {
        self.windows.get(&WindowKey {
            intent: intent.to_owned(),
            scope,
            key: key.to_owned(),
        })
    }

    /// Spend (actual + in-flight estimates) of a scope key in the `period` containing `now`.
    pub fn spent(&self, scope: Scope, key: &str, period: BudgetPeriod, now: Timestamp) -> u64 {
        self.spend
            .get(&SpendKey {
                scope,
                key: key.to_owned(),
                period: period_index(period),
                start: period_start(period, now),
            })
            .copied()
            .unwrap_or(0)
    }

    /// Tasks the ledger holds a charge for.
    pub fn admitted_tasks(&self) -> usize {
        self.charges.len()
    }

    /// Drops what no current window or period can need any more (the controller calls this at each
    /// resync, which bounds the ledger to the admissions of the last [`SPEND_HORIZON`]).
    pub fn prune(&mut self, now: Timestamp) {
        let window_cut = now
            .as_millisecond()
            .saturating_sub(MAX_WINDOW.as_millis() as i64);
        self.windows.retain(|_, times| {
            while times.front().is_some_and(|t| *t <= window_cut) {
                times.pop_front();
            }
            !times.is_empty()
        });
        let spend_cut = now.checked_sub(SPEND_HORIZON).unwrap_or(Timestamp::MIN);
        self.charges.retain(|_, c| c.admitted_at >= spend_cut);
        self.spend.retain(|k, _| k.start >= spend_cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane_api::TaskPhase;
    use agentplane_api::intent::{PrivacyLevel, RequiredResources};
    use agentplane_api::task::{AgentTaskSpec, DeviceRef, ModelSelection, Usage};
    use agentplane_api::{Envelope, EnvelopeSignature};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn task(
        id: &str,
        phase: TaskPhase,
        admitted: Option<Timestamp>,
        cost: Option<u64>,
    ) -> TaskRecord {
        let mut status = AgentTaskStatus {
            phase: Some(phase),
            usage: cost.map(|c| Usage {
                input_tokens: 1,
                output_tokens: 1,
                cost_micros: c,
            }),
            ..Default::default()
        };
        if let Some(at) = admitted {
            status.model = Some(ModelSelection {
                requested: None,
                selected: Some("gone".into()),
                tier: Some(0),
            });
            status
                .conditions
                .push(admission_condition(true, "WithinPolicy", "", at));
        }
        TaskRecord {
            id: id.into(),
            spec: AgentTaskSpec {
                device_ref: DeviceRef { name: "d1".into() },
                envelope: Envelope {
                    payload_type: "t".into(),
                    payload: "e30=".into(),
                    signatures: vec![EnvelopeSignature {
                        keyid: String::new(),
                        sig: String::new(),
                    }],
                },
                user_id: "u1".into(),
                intent_type: "summarize".into(),
                privacy_level: PrivacyLevel::Public,
                required_resources: RequiredResources::default(),
                cancel: None,
            },
            status,
            created_at: ts("2025-01-01T00:00:00Z"),
            version: crate::store::Version("1".into()),
        }
    }

    fn subject() -> Subject<'static> {
        Subject {
            intent: "summarize",
            user: "u1",
            device: "d1",
        }
    }

    #[test]
    fn estimates_are_reserved_then_replaced_by_the_real_cost() {
        let now = ts("2025-01-01T12:00:00.250Z");
        let mut l = Ledger::default();
        l.record_admission("t1", &subject(), now, 100);
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Day, now), 100);
        assert_eq!(l.spent(Scope::Namespace, "", BudgetPeriod::Month, now), 100);
        assert_eq!(
            l.spent(Scope::User, "someone-else", BudgetPeriod::Day, now),
            0
        );
        // A late non-terminal event changes nothing; success replaces the estimate.
        let queued = task("t1", TaskPhase::Queued, Some(now), None);
        l.observe(&queued, None, now);
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Day, now), 100);
        let done = task("t1", TaskPhase::Succeeded, Some(now), Some(42));
        l.observe(&done, None, now);
        assert_eq!(l.spent(Scope::User, "u1", BudgetPeriod::Hour, now), 42);
        // Settled is final, even against a stale event or a repeat.
        l.observe(&queued, None, now);
        l.observe(&done, None, now);
        assert_eq!(l.spent(Scope::User, "u1", BudgetPeriod::Hour, now), 42);
        // A task that fails or is cancelled releases its reservation.
        l.record_admission("t2", &subject(), now, 7);
        assert_eq!(l.spent(Scope::User, "u1", BudgetPeriod::Hour, now), 49);
        l.observe(
            &task("t2", TaskPhase::Cancelled, Some(now), None),
            None,
            now,
        );
        assert_eq!(l.spent(Scope::User, "u1", BudgetPeriod::Hour, now), 42);
        // The window counts both admissions.
        assert_eq!(l.window("summarize", Scope::Device, "d1").unwrap().len(), 2);
    }

    #[test]
    fn spend_falls_in_the_admission_period() {
        let mut l = Ledger::default();
        let before = ts("2025-01-01T23:59:59Z");
        let after = ts("2025-01-02T00:00:00Z");
        l.record_admission("t1", &subject(), before, 10);
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Day, before), 10);
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Day, after), 0);
        // Same ISO week and month.
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Week, after), 10);
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Month, after), 10);
    }

    #[test]
    fn rebuild_matches_what_was_recorded() {
        let at = ts("2025-01-01T12:00:00Z");
        let now = ts("2025-01-01T12:00:30Z");
        let tasks = vec![
            task("done", TaskPhase::Succeeded, Some(at), Some(30)),
            task("denied", TaskPhase::Denied, None, None),
            task("pending", TaskPhase::Pending, None, None),
            // Denied by an approver after admission: counted in the window, costs nothing.
            task("approver-denied", TaskPhase::Denied, Some(at), None),
            // In flight on a tier the policy no longer has: estimate 0.
            task("running", TaskPhase::Running, Some(at), None),
        ];
        let l = Ledger::rebuild(&tasks, None, now);
        assert_eq!(l.admitted_tasks(), 3);
        let w = l.window("summarize", Scope::User, "u1").unwrap();
        assert_eq!(w.len(), 3);
        // Whole-second storage: counted from the end of the stored second.
        assert!(w.iter().all(|t| *t == at.as_millisecond() + 1000));
        assert_eq!(l.spent(Scope::Namespace, "", BudgetPeriod::Day, now), 30);
    }

    #[test]
    fn prune_drops_old_windows_and_periods_only() {
        let mut l = Ledger::default();
        let old = ts("2025-01-01T00:00:00Z");
        let recent = ts("2025-02-10T00:00:00Z");
        l.record_admission("old", &subject(), old, 5);
        l.record_admission("new", &subject(), recent, 6);
        l.prune(ts("2025-02-15T00:00:00Z"));
        assert_eq!(l.admitted_tasks(), 1);
        assert_eq!(l.window("summarize", Scope::Device, "d1").unwrap().len(), 1);
        assert_eq!(l.spent(Scope::Device, "d1", BudgetPeriod::Month, recent), 6);
        // A late event for a pruned task is not counted again.
        l.observe(
            &task("old", TaskPhase::Succeeded, Some(old), Some(5)),
            None,
            ts("2025-02-15T00:00:00Z"),
        );
        assert_eq!(l.admitted_tasks(), 1);
    }

    #[test]
    fn set_condition_replaces_by_type() {
        let mut c = vec![admission_condition(
            false,
            "RateLimited",
            "held",
            Timestamp::UNIX_EPOCH,
        )];
        set_condition(
            &mut c,
            admission_condition(true, "WithinPolicy", "ok", Timestamp::UNIX_EPOCH),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].status, "True");
        assert_eq!(
            admitted_condition(&AgentTaskStatus {
                conditions: c,
                ..Default::default()
            }),
            Some(Timestamp::UNIX_EPOCH)
        );
    }
}
