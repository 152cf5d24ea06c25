//! Prometheus metrics at `/metrics`, kept in a `prometheus-client` registry (the Prometheus project's
//! Rust client: it owns the exposition format, label escaping and histogram bucketing).
//!
//! Call sites name a metric and give its labels as pairs (`metrics.inc("agentplane_intents_total",
//! &[("outcome", "accepted")])`); every metric is declared once in [`METRICS`] with its help text and
//! kind (a family shows up at `/metrics` with its first sample). A name missing
//! from the table is ignored with a debug log rather than failing a request over a metric.

use std::collections::HashMap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label set: (name, value) pairs in the order given.
type Labels = Vec<(String, String)>;

/// What kind of metric a name is.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Counter,
    Gauge,
    /// A histogram with these bucket upper bounds.
    Histogram(&'static [f64]),
}

/// Latency buckets in seconds: 1 ms to 60 s.
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Every metric this runtime exports: name, help, kind. Counter names end in `_total`.
pub const METRICS: &[(&str, &str, Kind)] = &[
    (
        "agentplane_http_requests_total",
        "HTTP requests answered, by route and status code.",
        Kind::Counter,
    ),
    (
        "agentplane_intents_total",
        "Intents submitted, by outcome (accepted, duplicate, or an error code).",
        Kind::Counter,
    ),
    (
        "agentplane_key_rotations_total",
        "Device key additions (rotation), by outcome.",
        Kind::Counter,
    ),
    (
        "agentplane_enrollments_total",
        "Enrollment attempts, by outcome.",
        Kind::Counter,
    ),
    (
        "agentplane_task_transitions_total",
        "Task phase transitions written by the controller and workers, by phase entered.",
        Kind::Counter,
    ),
    (
        "agentplane_admission_decisions_total",
        "Admission decisions by the controller, by decision and reason.",
        Kind::Counter,
    ),
    (
        "agentplane_model_calls_total",
        "Model calls, by tier and outcome.",
        Kind::Counter,
    ),
    (
        "agentplane_model_tokens_total",
        "Tokens used by model calls, by tier, namespace and direction.",
        Kind::Counter,
    ),
    (
        "agentplane_cost_micros_total",
        "Cost of model calls in millionths of the currency unit, by tier and namespace.",
        Kind::Counter,
    ),
    (
        "agentplane_tool_calls_total",
        "Tool calls of plans, by server, tool and outcome (ok, error, refused, failed).",
        Kind::Counter,
    ),
    (
        "agentplane_dead_letters_total",
        "Messages taken off the dead-letter queue.",
        Kind::Counter,
    ),
    (
        "agentplane_circuit_breaker_trips_total",
        "Automatic suspensions of a namespace by its AgentPolicy's circuit breaker, by trigger.",
        Kind::Counter,
    ),
    (
        "agentplane_tasks_deleted_total",
        "AgentTasks deleted, by the phase they were in.",
        Kind::Counter,
    ),
    (
        "agentplane_operator_leader",
        "1 while this operator replica holds the leader Lease, else 0.",
        Kind::Gauge,
    ),
    (
        "agentplane_tasks",
        "Tasks by phase, as last observed by this process.",
        Kind::Gauge,
    ),
    (
        "agentplane_queue_depth",
        "Messages in the task queue (visible and in flight), as last sampled.",
        Kind::Gauge,
    ),
    (
        "agentplane_queue_lag_seconds",
        "Time from a task being queued to a worker taking it.",
        Kind::Histogram(LATENCY),
    ),
    (
        "agentplane_reconcile_seconds",
        "Duration of one controller reconcile.",
        Kind::Histogram(LATENCY),
    ),
    (
        "agentplane_model_call_seconds",
        "Duration of model calls, by tier.",
        Kind::Histogram(LATENCY),
    ),
    (
        "agentplane_audit_appends_total",
        "Leaves appended to the audit log (an event already recorded under its key is not counted).",
        Kind::Counter,
    ),
    (
        "agentplane_audit_append_failures_total",
        "Audit log appends that failed (each is retried; writes are refused until it succeeds).",
        Kind::Counter,
    ),
    (
        "agentplane_audit_log_size",
        "Leaves in the audit log.",
        Kind::Gauge,
    ),
    (
        "agentplane_audit_checkpoints_total",
        "Signed audit log checkpoints.",
        Kind::Counter,
    ),
];

/// Builds histograms with a metric's buckets.
#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

pub struct Metrics {
    /// Last phase seen per task, behind `agentplane_tasks{phase}`.
    task_phases: std::sync::Mutex<HashMap<String, agentplane_api::TaskPhase>>,
    registry: Registry,
    counters: HashMap<&'static str, Family<Labels, Counter>>,
    gauges: HashMap<&'static str, Family<Labels, Gauge>>,
    histograms: HashMap<&'static str, Family<Labels, Histogram, Buckets>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let (mut counters, mut gauges, mut histograms) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        for &(name, help, kind) in METRICS {
            // The client ends help text with a period of its own.
            let help = help.trim_end_matches('.');
            match kind {
                Kind::Counter => {
                    let f = Family::<Labels, Counter>::default();
                    // The client appends `_total` to counters itself.
                    registry.register(name.trim_end_matches("_total"), help, f.clone());
                    counters.insert(name, f);
                }
                Kind::Gauge => {
                    let f = Family::<Labels, Gauge>::default();
                    registry.register(name, help, f.clone());
                    gauges.insert(name, f);
                }
                Kind::Histogram(buckets) => {
                    let f = Family::new_with_constructor(Buckets(buckets));
                    registry.register(name, help, f.clone());
                    histograms.insert(name, f);
                }
            }
        }
        Metrics {
            task_phases: std::sync::Mutex::new(HashMap::new()),
            registry,
            counters,
            gauges,
            histograms,
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn unknown(name: &str) {
    tracing::debug!(
        metric = name,
        "metric not declared in metrics::METRICS; ignored"
    );
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(&self, name: &'static str, pairs: &[(&str, &str)], n: u64) {
        match self.counters.get(name) {
            Some(f) => {
                f.get_or_create(&labels(pairs)).inc_by(n);
            }
            None => unknown(name),
        }
    }

    pub fn inc(&self, name: &'static str, pairs: &[(&str, &str)]) {
        self.add(name, pairs, 1);
    }

    /// Sets a gauge.
    pub fn set_gauge(&self, name: &'static str, pairs: &[(&str, &str)], v: i64) {
        match self.gauges.get(name) {
            Some(f) => {
                f.get_or_create(&labels(pairs)).set(v);
            }
            None => unknown(name),
        }
    }

    /// Adds `delta` (may be negative) to a gauge.
    pub fn add_gauge(&self, name: &'static str, pairs: &[(&str, &str)], delta: i64) {
        match self.gauges.get(name) {
            Some(f) => {
                f.get_or_create(&labels(pairs)).inc_by(delta);
            }
            None => unknown(name),
        }
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &'static str, pairs: &[(&str, &str)], v: f64) {
        match self.histograms.get(name) {
            Some(f) => f.get_or_create(&labels(pairs)).observe(v),
            None => unknown(name),
        }
    }

    /// Records that task `id` is now in `phase`, keeping `agentplane_tasks{phase}` a count of the
    /// tasks this process has seen, by their latest phase. Idempotent.
    pub fn observe_task_phase(&self, id: &str, phase: agentplane_api::TaskPhase) {
        let mut phases = self.task_phases.lock().unwrap_or_else(|e| e.into_inner());
        let old = phases.insert(id.to_owned(), phase);
        if old == Some(phase) {
            return;
        }
        if let Some(old) = old {
            self.add_gauge("agentplane_tasks", &[("phase", old.as_str())], -1);
        }
        self.add_gauge("agentplane_tasks", &[("phase", phase.as_str())], 1);
    }

    /// Drops a deleted task from `agentplane_tasks`.
    pub fn forget_task(&self, id: &str) {
        let mut phases = self.task_phases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = phases.remove(id) {
            self.add_gauge("agentplane_tasks", &[("phase", old.as_str())], -1);
        }
    }

    /// The OpenMetrics text format (what Prometheus scrapes; see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series_of_every_kind() {
        let m = Metrics::default();
        m.inc("agentplane_intents_total", &[("outcome", "accepted")]);
        m.inc("agentplane_intents_total", &[("outcome", "accepted")]);
        m.inc("agentplane_intents_total", &[("outcome", "bad\"sig")]);
        m.set_gauge("agentplane_operator_leader", &[], 1);
        m.observe("agentplane_reconcile_seconds", &[], 0.003);
        m.inc("agentplane_not_declared_total", &[]);
        m.observe_task_phase("t1", agentplane_api::TaskPhase::Pending);
        m.observe_task_phase("t1", agentplane_api::TaskPhase::Queued);
        m.observe_task_phase("t2", agentplane_api::TaskPhase::Queued);
        m.observe_task_phase("t2", agentplane_api::TaskPhase::Queued);
        let text = m.render();
        assert!(
            text.contains("agentplane_intents_total{outcome=\"accepted\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("agentplane_intents_total{outcome=\"bad\\\"sig\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE agentplane_intents counter"), "{text}");
        assert!(text.contains("agentplane_operator_leader 1"), "{text}");
        assert!(
            text.contains("agentplane_tasks{phase=\"Queued\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("agentplane_tasks{phase=\"Pending\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("agentplane_reconcile_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(!text.contains("not_declared"));
        assert!(text.contains("# HELP agentplane_intents Intents submitted, by outcome (accepted, duplicate, or an error code).\n"), "{text}");
    }

    #[test]
    fn every_counter_name_ends_in_total() {
        for (name, _, kind) in METRICS {
            assert_eq!(
                matches!(kind, Kind::Counter),
                name.ends_with("_total"),
                "{name}"
            );
        }
    }
}
