//! Logs and traces of the edge agent.
//!
//! [`init`] installs the `tracing` subscriber: the fmt layer (text or JSON, on stderr) under a
//! `Targets` filter from `RUST_LOG` (the same syntax for what a device needs, without linking a regex
//! engine into a binary meant for a Pi) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, a tracing-opentelemetry layer exporting the agent's
//! spans over OTLP/HTTP with protobuf (`OTEL_SERVICE_NAME`, `OTEL_BSP_*` and the other standard
//! variables apply). OTLP/gRPC is not built in: tonic would add a second HTTP/2 stack to a device
//! binary that has a size budget. Without an endpoint there is no OpenTelemetry layer at all.
//!
//! The agent starts each task's W3C trace: capturing an intent (the UI action or `submit`) is the
//! root span, whose `traceparent` is stored with the outbox entry, and each attempt to send it is a
//! child span whose context goes out in the request's `traceparent` header. Without the layer the
//! stored `traceparent` is a random one (capture.rs) and is sent as it is.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use reqwest_edge as reqwest;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

const TRACEPARENT: &str = "traceparent";

/// Only the agent's own spans are exported (never the exporter's own HTTP requests).
const EXPORTED_TARGET: &str = "agentplane_edge";

/// Export timeout when `OTEL_EXPORTER_OTLP_TIMEOUT` does not say (the OTLP default).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "{var}={value:?} is not supported by the edge agent: use http/protobuf (gRPC is not built in)"
    )]
    Protocol { var: &'static str, value: String },
    #[error("{var}={value:?} is not a number of milliseconds")]
    Timeout { var: &'static str, value: String },
    #[error("OTLP export needs a running tokio runtime to send from")]
    NoRuntime,
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("building the OTLP HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("installing the tracing subscriber: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

/// Export settings from the standard `OTEL_*` variables (read through `var`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpSettings {
    pub timeout: Duration,
    /// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub default_service_name: Option<String>,
}

impl OtlpSettings {
    /// `None` when no endpoint is configured: nothing is exported.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        default_service: &str,
    ) -> Result<Option<OtlpSettings>, TelemetryError> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
            && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        {
            return Ok(None);
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(value) = set(var) {
                if value.trim() != "http/protobuf" {
                    return Err(TelemetryError::Protocol { var, value });
                }
                break;
            }
        }
        let mut timeout = DEFAULT_EXPORT_TIMEOUT;
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ] {
            if let Some(value) = set(var) {
                timeout = value
                    .trim()
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| TelemetryError::Timeout { var, value })?;
                break;
            }
        }
        let named = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs
                    .split(',')
                    .any(|kv| kv.trim_start().starts_with("service.name="))
            });
        Ok(Some(OtlpSettings {
            timeout,
            default_service_name: (!named).then(|| default_service.to_owned()),
        }))
    }
}

/// Keeps span export alive; dropping it (or [`TelemetryGuard::shutdown`]) flushes the spans still
/// batched and stops the exporter.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter. Call it outside async code, while the runtime [`init`] ran on
    /// is still alive (the exports run on it).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("agentplane-edge: flushing spans at shutdown failed: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs logging and, when an OTLP endpoint is configured, span export (call it inside the tokio
/// runtime that will carry the exports).
pub fn init(json: bool, default_service: &str) -> Result<TelemetryGuard, TelemetryError> {
    let settings = OtlpSettings::from_vars(|v| std::env::var(v).ok(), default_service)?;
    let provider = settings.as_ref().map(provider).transpose()?;
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    let text = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("agentplane-edge"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(EXPORTED_TARGET, tracing::Level::TRACE),
            )
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

fn provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, TelemetryError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    // Our reqwest (rustls on ring, as for the gateway), not the exporter's default client.
    crate::gateway::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        .build()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(settings.timeout)
        .with_http_client(OnRuntime { client, runtime })
        .build()?;
    let mut resource = Resource::builder();
    if let Some(name) = &settings.default_service_name {
        resource = resource.with_service_name(name.clone());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// reqwest driven by our runtime: the SDK's batch processor exports from a thread of its own, where
/// reqwest's async client would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl HttpClient for OnRuntime {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let sent = self
            .runtime
            .spawn(async move { HttpClient::send_bytes(&client, request).await });
        Box::pin(async move { sent.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}

/// The context whose (remote) span `traceparent` names; `None` when it is malformed.
pub fn remote_context(traceparent: &str) -> Option<Context> {
    let traceparent = traceparent.trim();
    if !agentplane_api::wire::traceparent_is_well_formed(traceparent) {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of `span`, or `None` when it is not traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` (not yet entered) a child of the span `traceparent` names; `false` when that did not
/// happen (malformed, or not traced).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) -> bool {
    match remote_context(traceparent) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn settings_come_from_the_standard_variables() {
        assert_eq!(OtlpSettings::from_vars(vars(&[]), "e").unwrap(), None);
        let s = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500"),
            ]),
            "agentplane-edge",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.default_service_name.as_deref(), Some("agentplane-edge"));
        let s = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c/v1/traces"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_SERVICE_NAME", "kiosk"),
            ]),
            "e",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.default_service_name, None);
    }

    #[test]
    fn grpc_is_refused_by_name() {
        let e = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
            "e",
        )
        .unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
    }

    #[test]
    fn spans_continue_a_stored_traceparent_only_when_traced() {
        let untraced = tracing::info_span!("submit");
        assert!(!set_remote_parent(&untraced, TP));
        assert_eq!(traceparent_of(&untraced), None);

        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("submit");
            assert!(set_remote_parent(&span, TP));
            let tp = traceparent_of(&span).unwrap();
            assert!(
                tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{tp}"
            );
            assert_ne!(tp, TP, "its own span id");
            assert!(!set_remote_parent(&tracing::info_span!("x"), "00-0-0-01"));
        });
    }
}
