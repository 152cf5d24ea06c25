//! Prometheus counters, rendered in the text exposition format at `/metrics`. Hand-rolled: a handful
//! of labelled counters does not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Help text for every metric this runtime exports.
const HELP: &[(&str, &str)] = &[
    (
        "agentplane_http_requests_total",
        "HTTP requests answered, by route and status code.",
    ),
    (
        "agentplane_intents_total",
        "Intents submitted, by outcome (accepted, duplicate, or an error code).",
    ),
    (
        "agentplane_enrollments_total",
        "Enrollment attempts, by outcome.",
    ),
    (
        "agentplane_task_transitions_total",
        "Task phase transitions written by the controller and workers.",
    ),
    (
        "agentplane_model_calls_total",
        "Model calls, by tier and outcome.",
    ),
    (
        "agentplane_model_tokens_total",
        "Tokens used by model calls, by tier and direction.",
    ),
    (
        "agentplane_cost_micros_total",
        "Cost of model calls in millionths of the currency unit, by tier.",
    ),
    (
        "agentplane_dead_letters_total",
        "Messages taken off the dead-letter queue.",
    ),
];

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Metrics {
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], n: u64) {
        let mut rendered = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                rendered.push(',');
            }
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(rendered, "{k}=\"{v}\"");
        }
        // A poisoned lock only means another thread panicked mid-increment; counters stay usable.
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry((name, rendered)).or_default() += n;
    }

    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((n, labels), v) in c.iter().filter(|((n, _), _)| n == name) {
                if labels.is_empty() {
                    let _ = writeln!(out, "{n} {v}");
                } else {
                    let _ = writeln!(out, "{n}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_counters() {
        let m = Metrics::default();
        m.inc("agentplane_intents_total", &[("outcome", "accepted")]);
        m.inc("agentplane_intents_total", &[("outcome", "accepted")]);
        m.inc("agentplane_intents_total", &[("outcome", "bad\"sig")]);
        let text = m.render();
        assert!(text.contains("agentplane_intents_total{outcome=\"accepted\"} 2"));
        assert!(text.contains("agentplane_intents_total{outcome=\"bad\\\"sig\"} 1"));
        assert!(text.contains("# TYPE agentplane_intents_total counter"));
    }
}
