//! Network timeouts for every AWS and Kubernetes call, set in the provider block.
//!
//! An endpoint that accepts TCP and never answers must not hang a plan: every call gets a
//! connect timeout, a read timeout (no response within it fails the attempt) and an operation
//! timeout (the whole call, retries included). The AWS clients take them through the SDK's own
//! [`aws_config::timeout::TimeoutConfig`]; the Kubernetes client through its `Config`
//! connect/read/write timeouts, with the operation bound applied around each call in
//! [`crate::kube`]. Ctrl-C is separate: StopProvider cancels in-flight calls at once.

use std::time::Duration;

use crate::framework::{AttrPath, Attribute, Diagnostics, Value};

/// The three timeouts, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connection set-up.
    pub connect: Duration,
    /// From sending a request to the first byte of its response, per attempt.
    pub read: Duration,
    /// One whole API call, every retry included.
    pub operation: Duration,
}

/// Provider-block attribute names, as the diagnostics and docs name them.
pub const CONNECT: &str = "connect_timeout";
pub const READ: &str = "read_timeout";
pub const OPERATION: &str = "operation_timeout";

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            // Server-side applies of large CRDs on a busy API server are the slowest calls.
            read: Duration::from_secs(120),
            operation: Duration::from_secs(300),
        }
    }
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error(
        "{0:?} is not a duration; write it as a number and a unit, e.g. \"30s\", \"2m\" or \"1m30s\""
    )]
    Unparsable(String),
    #[error("{0:?} is negative; a timeout must be greater than zero")]
    Negative(String),
    #[error("{0:?} is zero; a timeout must be greater than zero (there is no \"no timeout\")")]
    Zero(String),
}

/// Parses a duration as Terraform users write them ("30s", "2m", "1m30s", "500ms", "1.5s").
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let d: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|_| DurationError::Unparsable(text.to_string()))?;
    if d.is_negative() {
        return Err(DurationError::Negative(text.to_string()));
    }
    if d.is_zero() {
        return Err(DurationError::Zero(text.to_string()));
    }
    Duration::try_from(d).map_err(|_| DurationError::Unparsable(text.to_string()))
}

/// The provider-block attributes.
pub fn attributes() -> [Attribute; 3] {
    [
        Attribute::string(CONNECT).optional().describe(
            "Longest wait for a TCP/TLS connection to an AWS or Kubernetes endpoint, e.g. \"10s\". Default \"10s\".",
        ),
        Attribute::string(READ).optional().describe(
            "Longest wait for a response to one request attempt, e.g. \"60s\". Default \"2m\".",
        ),
        Attribute::string(OPERATION).optional().describe(
            "Longest time one API call may take, every retry included, e.g. \"5m\". Default \"5m\".",
        ),
    ]
}

/// Reads the timeouts from a provider configuration. Null or unknown values keep the
/// default (unknown ones are checked again when the provider is configured); every bad value
/// is an error on its own attribute.
pub fn from_config(config: &Value) -> Result<Timeouts, Diagnostics> {
    let mut t = Timeouts::default();
    let mut diags = Diagnostics::new();
    for (name, slot) in [
        (CONNECT, &mut t.connect),
        (READ, &mut t.read),
        (OPERATION, &mut t.operation),
    ] {
        let Some(text) = config.get(name).as_str() else {
            continue;
        };
        match parse(text) {
            Ok(d) => *slot = d,
            Err(e) => diags.attr_error(
                AttrPath::attr(name),
                format!("Invalid {name}"),
                e.to_string(),
            ),
        }
    }
    if diags.has_errors() {
        Err(diags)
    } else {
        Ok(t)
    }
}

impl Timeouts {
    /// The SDK's timeout configuration. One attempt may take the connection plus the wait for
    /// its response; the operation timeout bounds all attempts together.
    pub fn aws(&self) -> aws_config::timeout::TimeoutConfig {
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .read_timeout(self.read)
            .operation_attempt_timeout(self.connect + self.read)
            .operation_timeout(self.operation)
            .build()
    }

    /// Sets the Kubernetes client's connect/read/write timeouts.
    pub fn apply_to_kube(&self, config: &mut kube::Config) {
        config.connect_timeout = Some(self.connect);
        config.read_timeout = Some(self.read);
        config.write_timeout = Some(self.read);
        // Count the read timeout from when a request is sent, not from when its pooled
        // connection went idle.
        config.reset_reader_on_write = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_terraform_users_write_them() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn bad_zero_and_negative_durations_are_refused() {
        assert!(matches!(parse("soon"), Err(DurationError::Unparsable(_))));
        assert!(matches!(parse("30"), Err(DurationError::Unparsable(_))));
        assert!(matches!(parse(""), Err(DurationError::Unparsable(_))));
        assert!(matches!(parse("0s"), Err(DurationError::Zero(_))));
        assert!(matches!(parse("-5s"), Err(DurationError::Negative(_))));
    }

    #[test]
    fn aws_attempt_covers_connect_and_read() {
        let t = Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(3),
            operation: Duration::from_secs(7),
        };
        let c = t.aws();
        assert_eq!(c.connect_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(c.read_timeout(), Some(Duration::from_secs(3)));
        assert_eq!(c.operation_attempt_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(c.operation_timeout(), Some(Duration::from_secs(7)));
    }
}
