//! hclog-style JSON logs on stderr.
//!
//! go-plugin reads the plugin's stderr line by line; a JSON object with `@level`, `@message`,
//! `@timestamp` (exactly `2006-01-02T15:04:05.000000Z07:00`) and `@module` is re-logged by
//! Terraform at that level under TF_LOG / TF_LOG_PROVIDER. Anything else is logged as a
//! plain debug line, so the format matters for users reading provider logs.

use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

pub struct HclogJson {
    module: &'static str,
}

impl HclogJson {
    pub fn new(module: &'static str) -> Self {
        HclogJson { module }
    }
}

struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.insert(f, serde_json::Value::String(v.to_string()));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.insert(f, v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.insert(f, v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.insert(f, v.into());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.insert(f, serde_json::Value::String(format!("{v:?}")));
    }
}

impl Fields {
    fn insert(&mut self, f: &Field, v: serde_json::Value) {
        let key = if f.name() == "message" {
            "@message".to_string()
        } else {
            f.name().to_string()
        };
        self.0.insert(key, v);
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// hclog's timestamp layout with microseconds, in UTC, for a time since the Unix epoch.
///
/// Written out by hand (civil-from-days) rather than pulling a date/time crate into a binary
/// whose size and start-up time are part of its contract.
pub fn timestamp(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days -> (year, month, day) for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_micros()
    )
}

fn now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

impl<S: Subscriber> Layer<S> for HclogJson {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        let mut m = fields.0;
        m.insert("@level".into(), level_name(event.metadata().level()).into());
        m.insert("@module".into(), self.module.into());
        m.insert("@timestamp".into(), timestamp(now()).into());
        m.entry("@message")
            .or_insert_with(|| serde_json::Value::String(String::new()));
        let mut line = serde_json::Value::Object(m).to_string();
        line.push('\n');
        // stderr is the only channel left; if it is gone there is nowhere to report that.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Installs the logger. The level comes from TF_LOG_PROVIDER, then TF_LOG, default info.
pub fn init() {
    use tracing_subscriber::prelude::*;
    let level = std::env::var("TF_LOG_PROVIDER")
        .or_else(|_| std::env::var("TF_LOG"))
        .ok()
        .and_then(|l| match l.to_ascii_lowercase().as_str() {
            "trace" | "json" => Some(tracing::level_filters::LevelFilter::TRACE),
            "debug" => Some(tracing::level_filters::LevelFilter::DEBUG),
            "info" => Some(tracing::level_filters::LevelFilter::INFO),
            "warn" => Some(tracing::level_filters::LevelFilter::WARN),
            "error" => Some(tracing::level_filters::LevelFilter::ERROR),
            "off" => Some(tracing::level_filters::LevelFilter::OFF),
            _ => None,
        })
        .unwrap_or(tracing::level_filters::LevelFilter::INFO);
    // Only our own crate's events: dependency internals (hyper, rustls) are noise to users.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("terraform_provider_agentplane", level)
        .with_target("tfplugin_protocol", level);
    let _ = tracing_subscriber::registry()
        .with(HclogJson::new("provider.terraform-provider-agentplane").with_filter(filter))
        .try_init();
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_layout() {
        use std::time::Duration;
        // 2024-03-05T06:07:08.123456789Z
        let t = Duration::new(1_709_618_828, 123_456_789);
        assert_eq!(super::timestamp(t), "2024-03-05T06:07:08.123456Z");
        assert_eq!(
            super::timestamp(Duration::ZERO),
            "1970-01-01T00:00:00.000000Z"
        );
        // a leap day
        assert_eq!(
            super::timestamp(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
