//! The circuit breaker's trip (issue 14 item 3): watches the namespace's task changes, feeds the
//! [`BreakerWindow`] (finished tasks and their outcome, spend as it happens), and when the policy's
//! `circuitBreaker` holds, suspends the namespace.
//!
//! A trip is one store write, [`TaskStore::trip_breaker`]: `spec.suspend = true` (the kill switch
//! the controller's admission and the worker's dequeue already obey) and `status.lastTrip` (why,
//! when, the figures). The audit leaf is appended by the audited store around that write (a
//! `decision` about `agentpolicy/default`, see [`crate::audit::breaker_event`]); this module adds the
//! metric `agentplane_circuit_breaker_trips_total{namespace, reason}`, a warning log line, and, where
//! there is a Kubernetes API ([`TripNotifier`]), an Event on the AgentPolicy.
//!
//! Evidence is dated by the task's own record, not by when the watcher saw it: a finished task by
//! its `Completed` condition's time, so a watcher that starts (or a new leader whose watch lists
//! every task again) counts only what finished inside the window, each task once. Spend is dated
//! when it is seen (a step's cost has no time of its own in status). After a trip the window is
//! cleared: turning `suspend` off resumes work without tripping again on the same evidence.

use std::collections::HashMap;
use std::sync::Arc;

use agentplane_api::TaskPhase;
use agentplane_api::policy::{AgentPolicySpec, BreakerTrip};
use async_trait::async_trait;
use jiff::Timestamp;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::policy::breaker::{BreakerWindow, Trigger};
use crate::store::{CONDITION_COMPLETED, DynStore, StoreError, TaskRecord};

/// Most unfinished tasks whose spend so far is remembered; past it the map starts over (a task
/// then counts its whole spend again once, erring towards tripping).
const MAX_TRACKED: usize = 100_000;

/// How often a watcher whose policy has no `circuitBreaker` looks again (the policy read is served
/// from the store's cache).
const ENABLE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Publishes a trip where operators look (a Kubernetes Event on the AgentPolicy).
#[async_trait]
pub trait TripNotifier: Send + Sync {
    async fn tripped(&self, trip: &BreakerTrip, trigger: Trigger);
}

/// The distributed runtime's notifier: a Warning Event `CircuitBreakerTripped` on the AgentPolicy.
pub struct KubeEventNotifier {
    pub recorder: kube::runtime::events::Recorder,
    pub namespace: String,
}

#[async_trait]
impl TripNotifier for KubeEventNotifier {
    async fn tripped(&self, trip: &BreakerTrip, trigger: Trigger) {
        use kube::Resource as _;
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(agentplane_api::policy::AgentPolicy::api_version(&()).into_owned()),
            kind: Some(agentplane_api::policy::AgentPolicy::kind(&()).into_owned()),
            name: Some(crate::store::sqlite::POLICY_NAME.into()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        let ev = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: "CircuitBreakerTripped".into(),
            note: Some(format!(
                "suspended by the circuit breaker ({}): {}",
                trigger.as_str(),
                trip.reason
            )),
            action: "Suspend".into(),
            secondary: None,
        };
        // Informational: the suspension and status.lastTrip are already written.
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "could not publish the circuit breaker's Event");
        }
    }
}

/// What the watcher keeps between events.
#[derive(Default)]
struct Evidence {
    window: BreakerWindow,
    /// Spend already counted per unfinished task.
    spent: HashMap<String, u64>,
    /// Finished tasks already counted, with when they finished (unix ms), kept for a window.
    finished: HashMap<String, i64>,
}

impl Evidence {
    /// Adds what `task` shows that was not counted yet; `true` if anything was.
    fn observe(&mut self, task: &TaskRecord, now: Timestamp) -> bool {
        let cost = task.status.usage.as_ref().map_or(0, |u| u.cost_micros);
        let before = self.spent.get(&task.id).copied().unwrap_or(0);
        let mut changed = false;
        let phase = task.phase();
        // A finished task's last spend is dated with its finish, so a re-listed old task (a restart)
        // falls outside the window instead of counting as spent now.
        let at = if phase.is_terminal() {
            finished_at(task).unwrap_or(now)
        } else {
            now
        };
        if cost > before && !self.finished.contains_key(&task.id) {
            self.window.spent(at, cost - before);
            changed = true;
        }
        if phase.is_terminal() {
            self.spent.remove(&task.id);
            if matches!(phase, TaskPhase::Failed | TaskPhase::Succeeded)
                && !self.finished.contains_key(&task.id)
            {
                self.finished.insert(task.id.clone(), at.as_millisecond());
                self.window.task_finished(at, phase == TaskPhase::Failed);
                changed = true;
            }
        } else if cost > before {
            if self.spent.len() >= MAX_TRACKED {
                self.spent.clear();
            }
            self.spent.insert(task.id.clone(), cost);
        }
        changed
    }

    /// Forgets finished tasks older than `window_seconds` (their evidence left the window too).
    fn prune(&mut self, window_seconds: u32, now: Timestamp) {
        let cutoff = now.as_millisecond() - i64::from(window_seconds.max(1)) * 1000;
        self.finished.retain(|_, at| *at > cutoff);
    }
}

/// When a terminal task finished: its `Completed` condition's time.
fn finished_at(task: &TaskRecord) -> Option<Timestamp> {
    task.status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_COMPLETED && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// Runs the breaker of one namespace's store.
pub struct BreakerWatch {
    pub store: DynStore,
    pub metrics: Arc<Metrics>,
    pub notifier: Option<Arc<dyn TripNotifier>>,
}

impl BreakerWatch {
    /// Runs until `shutdown` or until the store's change feed closes.
    pub async fn run(self, shutdown: CancellationToken) {
        // Subscribing to the Kubernetes store's changes starts a second watch of every AgentTask
        // in the operator (the controller has its own): a cost per task, so it is paid only once
        // a policy asks for a breaker. Tasks that finished before are read from the listing below.
        loop {
            match self.store.get_policy().await {
                Ok(Some(p)) if p.circuit_breaker.is_some() => break,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "circuit breaker: could not read the policy"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(ENABLE_POLL) => {}
            }
        }
        let mut changes = self.store.changes();
        let mut evidence = Evidence::default();
        // What the namespace did before this watcher started, within the window.
        match self.store.list_tasks().await {
            Ok(tasks) => {
                let now = Timestamp::now();
                for t in tasks.iter().filter(|t| t.phase().is_terminal()) {
                    evidence.observe(t, now);
                }
            }
            Err(e) => tracing::warn!(error = %e, "circuit breaker: could not list past tasks"),
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = changes.recv() => match ev {
                    Ok(ev) => {
                        if evidence.observe(&ev.task, Timestamp::now()) {
                            self.check(&mut evidence).await;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "circuit breaker fell behind the change feed; some evidence is lost");
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
    }

    async fn check(&self, evidence: &mut Evidence) {
        let policy = match self.store.get_policy().await {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "circuit breaker: could not read the policy");
                return;
            }
        };
        let AgentPolicySpec {
            suspend,
            circuit_breaker: Some(breaker),
            ..
        } = policy
        else {
            return;
        };
        let now = Timestamp::now();
        evidence.prune(breaker.window_seconds, now);
        if suspend {
            // Already off: nothing to trip, and what happens while suspended is not held against
            // the namespace once it is turned on again.
            return;
        }
        let Some((trip, trigger)) = evidence.window.check_trigger(&breaker, now) else {
            return;
        };
        match self.trip(trip.clone(), trigger).await {
            Ok(true) => evidence.window.clear(),
            Ok(false) => {}
            // The evidence stays: the next event checks again.
            Err(e) => {
                tracing::error!(error = %e, "circuit breaker: could not suspend the namespace")
            }
        }
    }

    async fn trip(&self, trip: BreakerTrip, trigger: Trigger) -> Result<bool, StoreError> {
        let namespace = self.store.namespace().to_owned();
        if !self.store.trip_breaker(trip.clone()).await? {
            return Ok(false);
        }
        self.metrics.inc(
            "agentplane_circuit_breaker_trips_total",
            &[("namespace", &namespace), ("reason", trigger.as_str())],
        );
        tracing::warn!(
            namespace,
            reason = %trip.reason,
            tasks = trip.tasks,
            failures = trip.failures,
            spend_micros = trip.spend_micros,
            "circuit breaker tripped: the namespace is suspended"
        );
        if let Some(n) = &self.notifier {
            n.tripped(&trip, trigger).await;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane_api::task::{AgentTaskStatus, Usage};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn task(id: &str, phase: TaskPhase, cost: u64, done_at: Option<Timestamp>) -> TaskRecord {
        let status = AgentTaskStatus {
            phase: Some(phase),
            usage: Some(Usage {
                cost_micros: cost,
                ..Usage::default()
            }),
            conditions: done_at
                .map(|at| Condition {
                    type_: CONDITION_COMPLETED.into(),
                    status: "True".into(),
                    reason: "Done".into(),
                    message: String::new(),
                    last_transition_time: Time(at),
                    observed_generation: None,
                })
                .into_iter()
                .collect(),
            ..AgentTaskStatus::default()
        };
        crate::store::test_task(id, status)
    }

    #[test]
    fn each_task_counts_once_at_its_completion_time_and_spend_as_deltas() {
        let now = Timestamp::now();
        let mut e = Evidence::default();
        assert!(e.observe(&task("a", TaskPhase::Running, 10, None), now));
        assert!(!e.observe(&task("a", TaskPhase::Running, 10, None), now));
        assert!(e.observe(&task("a", TaskPhase::Failed, 25, Some(now)), now));
        // A re-listed terminal task (a restart, a new leader) adds nothing.
        assert!(!e.observe(&task("a", TaskPhase::Failed, 25, Some(now)), now));
        let breaker = agentplane_api::policy::CircuitBreaker {
            window_seconds: 60,
            failures: Some(1),
            failure_percent: None,
            spend_micros: Some(25),
            min_tasks: 1,
        };
        let (trip, trigger) = e.window.check_trigger(&breaker, now).unwrap();
        assert_eq!(trigger, Trigger::Failures);
        assert_eq!((trip.tasks, trip.failures, trip.spend_micros), (1, 1, 25));

        // A task that finished long before the window does not count.
        let mut e = Evidence::default();
        let old = now - jiff::SignedDuration::from_secs(3600);
        e.observe(&task("b", TaskPhase::Failed, 0, Some(old)), now);
        assert_eq!(e.window.check(&breaker, now), None);
    }
}
