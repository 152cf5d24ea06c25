//! The circuit breaker: the kill switch set by the runtime itself when, over the last
//! `windowSeconds`, too many tasks failed (a count or a percentage, once `minTasks` finished) or the
//! namespace spent too much (every step of every task, finished or not).
//!
//! [`BreakerWindow`] is the evidence, fed by whoever sees tasks finish and steps cost; [`BreakerWindow::check`]
//! says whether to trip and why. Setting `suspend`, the status record, the Event, the audit leaf and
//! the metric belong to the caller: this module decides, it does not write.

use std::collections::VecDeque;

use agentplane_api::policy::{BreakerTrip, CircuitBreaker};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// One thing the breaker counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Evidence {
    Finished { failed: bool },
    Spent(u64),
}

/// Which trigger tripped: the `reason` label of `agentplane_circuit_breaker_trips_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Failures,
    FailurePercent,
    Spend,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Failures => "failures",
            Trigger::FailurePercent => "failure_percent",
            Trigger::Spend => "spend",
        }
    }
}

/// What the namespace did recently, as (unix ms, evidence), oldest first.
#[derive(Debug, Default)]
pub struct BreakerWindow {
    events: VecDeque<(i64, Evidence)>,
}

impl BreakerWindow {
    pub fn task_finished(&mut self, at: Timestamp, failed: bool) {
        self.push(at, Evidence::Finished { failed });
    }

    /// Spend of one step (model tokens); counted when it happens, so a plan that spends without
    /// ever finishing still trips a spend trigger.
    pub fn spent(&mut self, at: Timestamp, micros: u64) {
        if micros > 0 {
            self.push(at, Evidence::Spent(micros));
        }
    }

    fn push(&mut self, at: Timestamp, e: Evidence) {
        let ms = at.as_millisecond();
        // Keep the log sorted even if a writer's clock lags another's.
        let pos = self.events.partition_point(|(t, _)| *t <= ms);
        self.events.insert(pos, (ms, e));
    }

    /// Forgets all evidence: after a trip, so that turning `suspend` off again does not trip at
    /// once on the evidence that already tripped it.
    pub fn clear(&mut self) {
        self.events.clear();
    }

    /// Whether `breaker` trips at `now`, with the record to keep. Forgets evidence older than the
    /// window.
    pub fn check(&mut self, breaker: &CircuitBreaker, now: Timestamp) -> Option<BreakerTrip> {
        self.check_trigger(breaker, now).map(|(trip, _)| trip)
    }

    /// [`BreakerWindow::check`], also saying which trigger tripped.
    pub fn check_trigger(
        &mut self,
        breaker: &CircuitBreaker,
        now: Timestamp,
    ) -> Option<(BreakerTrip, Trigger)> {
        let window_ms = i64::from(breaker.window_seconds.max(1)) * 1000;
        let cutoff = now.as_millisecond().saturating_sub(window_ms);
        while self.events.front().is_some_and(|(t, _)| *t <= cutoff) {
            self.events.pop_front();
        }
        let (mut tasks, mut failures, mut spend) = (0u32, 0u32, 0u64);
        for (_, e) in &self.events {
            match e {
                Evidence::Finished { failed } => {
                    tasks += 1;
                    failures += u32::from(*failed);
                }
                Evidence::Spent(m) => spend = spend.saturating_add(*m),
            }
        }
        let window = breaker.window_seconds;
        let enough = tasks >= breaker.min_tasks.max(1);
        let reason = if let Some(limit) = breaker.failures.filter(|l| enough && failures >= *l) {
            Some((
                format!(
                    "{failures} of {tasks} tasks failed in the last {window} s (limit {limit} failures)"
                ),
                Trigger::Failures,
            ))
        } else if let Some(pct) = breaker
            .failure_percent
            .filter(|p| enough && u64::from(failures) * 100 >= u64::from(*p) * u64::from(tasks))
        {
            Some((
                format!("{failures} of {tasks} tasks failed in the last {window} s (limit {pct}%)"),
                Trigger::FailurePercent,
            ))
        } else {
            breaker.spend_micros.filter(|l| spend >= *l).map(|limit| {
                (
                    format!("spent {spend} micros in the last {window} s (limit {limit})"),
                    Trigger::Spend,
                )
            })
        };
        reason.map(|(reason, trigger)| {
            (
                BreakerTrip {
                    tripped_at: Time(now),
                    reason,
                    tasks,
                    failures,
                    spend_micros: spend,
                },
                trigger,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker {
            window_seconds: 300,
            failures: Some(5),
            failure_percent: None,
            spend_micros: None,
            min_tasks: 5,
        }
    }

    #[test]
    fn trips_on_the_fifth_failing_task_and_not_before() {
        let mut w = BreakerWindow::default();
        let now = Timestamp::now();
        for i in 0..4 {
            w.task_finished(now, true);
            assert_eq!(w.check(&breaker(), now), None, "after {} failures", i + 1);
        }
        w.task_finished(now, false);
        assert_eq!(w.check(&breaker(), now), None, "4 failures of 5 tasks");
        w.task_finished(now, true);
        let trip = w.check(&breaker(), now).expect("5 failures trip");
        assert_eq!((trip.tasks, trip.failures), (6, 5));
        assert!(
            trip.reason.contains("5 of 6 tasks failed"),
            "{}",
            trip.reason
        );
    }

    #[test]
    fn failures_leave_the_window() {
        let mut w = BreakerWindow::default();
        let t0 = Timestamp::now();
        for _ in 0..4 {
            w.task_finished(t0, true);
        }
        let later = t0 + SignedDuration::from_secs(301);
        w.task_finished(later, true);
        assert_eq!(w.check(&breaker(), later), None);
    }

    #[test]
    fn failure_rate_needs_min_tasks_and_spend_trips_alone() {
        let rate = CircuitBreaker {
            failures: None,
            failure_percent: Some(50),
            min_tasks: 4,
            ..breaker()
        };
        let mut w = BreakerWindow::default();
        let now = Timestamp::now();
        w.task_finished(now, true);
        w.task_finished(now, true);
        assert_eq!(w.check(&rate, now), None, "2 tasks are below minTasks");
        w.task_finished(now, false);
        w.task_finished(now, false);
        assert!(w.check(&rate, now).unwrap().reason.contains("limit 50%"));

        let spend = CircuitBreaker {
            failures: None,
            spend_micros: Some(1000),
            ..breaker()
        };
        let mut w = BreakerWindow::default();
        w.spent(now, 600);
        assert_eq!(w.check(&spend, now), None);
        w.spent(now, 400);
        let (trip, trigger) = w.check_trigger(&spend, now).unwrap();
        assert_eq!(trigger, Trigger::Spend);
        assert_eq!(trip.spend_micros, 1000);
        w.clear();
        assert_eq!(w.check(&spend, now), None, "cleared after a trip");
        assert!(trip.reason.contains("spent 1000 micros"), "{}", trip.reason);
    }
}
