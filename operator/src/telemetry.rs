//! Logs and traces of the runtime's processes.
//!
//! [`init`] installs the `tracing` subscriber: the fmt layer (JSON or text, on stderr) under an
//! `EnvFilter` (`RUST_LOG`, default `info`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, a tracing-opentelemetry layer exporting this crate's
//! spans over OTLP (`OTEL_EXPORTER_OTLP_PROTOCOL` `grpc` or `http/protobuf`, the default;
//! `OTEL_SERVICE_NAME`, `OTEL_BSP_*` and the other standard variables apply). Without an endpoint
//! there is no OpenTelemetry layer at all: no exporter, no thread, no per-span cost.
//!
//! The W3C trace begun at the edge rides every hop: the gateway request's `traceparent` header, the
//! AgentTask's annotation (`status.traceId` in the embedded store), the queue message's `traceparent`
//! attribute, the model call's header. The helpers here make each hop's span a child of the previous
//! one and hand on that span's own context; without the OpenTelemetry layer (nothing is exported, so
//! there are no real spans to point at) they hand on the trace id with a fresh span id, so the trace id
//! still reaches every hop and the model endpoint.

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
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The W3C header, message attribute and carrier key.
pub const TRACEPARENT: &str = "traceparent";

/// Only spans of this crate are exported: the libraries' own spans (kube, hyper, the AWS SDK) would
/// bury the task's hops, and the exporter's own HTTP requests must never become spans to export.
const EXPORTED_TARGET: &str = "agentplane";

/// Export timeout when `OTEL_EXPORTER_OTLP_TIMEOUT` does not say (the OTLP default).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{var}={value:?} is not supported: use grpc or http/protobuf")]
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

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how to export, from the standard `OTEL_*` variables (read through `var`, so tests need
/// not touch the process environment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpSettings {
    pub protocol: Protocol,
    pub timeout: Duration,
    /// `service.name`, when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one (the
    /// SDK reads those itself).
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
        let protocol = match first_set(
            &set,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ],
        ) {
            None => Protocol::HttpProtobuf,
            Some((_, v)) if v.trim() == "grpc" => Protocol::Grpc,
            Some((_, v)) if v.trim() == "http/protobuf" => Protocol::HttpProtobuf,
            Some((var, value)) => return Err(TelemetryError::Protocol { var, value }),
        };
        let timeout = match first_set(
            &set,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ],
        ) {
            None => DEFAULT_EXPORT_TIMEOUT,
            Some((var, value)) => value
                .trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| TelemetryError::Timeout { var, value })?,
        };
        let named = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs
                    .split(',')
                    .any(|kv| kv.trim_start().starts_with("service.name="))
            });
        Ok(Some(OtlpSettings {
            protocol,
            timeout,
            default_service_name: (!named).then(|| default_service.to_owned()),
        }))
    }
}

fn first_set(
    set: &impl Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Option<(&'static str, String)> {
    names.iter().find_map(|n| set(n).map(|v| (*n, v)))
}

/// Keeps span export alive; dropping it (or [`TelemetryGuard::shutdown`]) flushes the spans still
/// batched and stops the exporter.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter. Blocks up to the export timeout, so call it outside async code
    /// but while the tokio runtime that [`init`] ran on is still alive: the exports run on it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            // The subscriber may be the thing that failed; stderr always works.
            eprintln!("agentplane: flushing spans at shutdown failed: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs logging and, when an OTLP endpoint is configured, span export. `log_format` is `text` or
/// anything else for JSON; `default_service` is the `service.name` unless `OTEL_SERVICE_NAME` (or
/// `OTEL_RESOURCE_ATTRIBUTES`) gives one. With an endpoint, call it inside the tokio runtime that
/// will carry the exports, and keep the guard until that runtime's work is done.
pub fn init(log_format: &str, default_service: &str) -> Result<TelemetryGuard, TelemetryError> {
    let settings = OtlpSettings::from_vars(|v| std::env::var(v).ok(), default_service)?;
    let provider = settings.as_ref().map(provider).transpose()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let text = (log_format == "text")
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (log_format != "text").then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("agentplane"))
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
    if let Some(s) = &settings {
        tracing::info!(protocol = ?s.protocol, "exporting spans over OTLP");
    }
    Ok(TelemetryGuard { provider })
}

fn provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, TelemetryError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let exporter = match settings.protocol {
        // tonic's channel runs its connection on this runtime (it is built inside it), so the batch
        // processor's thread can export through it.
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .with_timeout(settings.timeout)
            .build()?,
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(settings.timeout)
            .with_http_client(OnRuntime {
                client: reqwest::Client::builder()
                    .timeout(settings.timeout)
                    .build()?,
                runtime,
            })
            .build()?,
    };
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
/// reqwest's async client would find no reactor, so each request is spawned onto the runtime.
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

// ---- W3C trace context -------------------------------------------------------------------------

/// The context whose (remote) span is the one `traceparent` names; `None` when it is malformed.
pub fn remote_context(traceparent: &str) -> Option<Context> {
    let traceparent = traceparent.trim();
    if !agentplane_api::wire::traceparent_is_well_formed(traceparent) {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of `span`, or `None` when it is not traced (no OpenTelemetry layer, or the
/// filter disabled it).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The trace id of `span` (32 lowercase hex digits), when it is traced.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `span` (not yet entered) a child of the remote span `traceparent` names. `false` when that
/// did not happen: malformed, no OpenTelemetry layer, or a span the filter disabled.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) -> bool {
    match remote_context(traceparent) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// Makes `span` a child of the `traceparent` header of an incoming request, if it has a valid one.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tp| set_remote_parent(span, tp))
}

/// Puts `span` (not yet entered) into the task's trace `trace_id`: under `traceparent` (the previous
/// hop) when it is in that trace, else under the current span when that is in the trace, else under
/// a stand-in parent in the trace (a store that kept only the trace id).
pub fn join_trace(span: &tracing::Span, trace_id: &str, traceparent: Option<&str>) {
    if let Some(tp) = traceparent.filter(|tp| trace_id_in(tp).as_deref() == Some(trace_id))
        && set_remote_parent(span, tp)
    {
        return;
    }
    if trace_id_of(&tracing::Span::current()).as_deref() == Some(trace_id) {
        return;
    }
    if let Some(tp) = fresh_traceparent(trace_id) {
        set_remote_parent(span, &tp);
    }
}

/// The `traceparent` to hand on from `span` in the trace `trace_id`: the span's own context when it is
/// in that trace, else a fresh span id under `trace_id` (not traced: the trace id still rides along).
/// `None` only for a malformed trace id.
pub fn hop_traceparent(span: &tracing::Span, trace_id: &str) -> Option<String> {
    traceparent_of(span)
        .filter(|tp| trace_id_in(tp).as_deref() == Some(trace_id))
        .or_else(|| fresh_traceparent(trace_id))
}

/// The trace id inside a well-formed `traceparent`.
pub fn trace_id_in(traceparent: &str) -> Option<String> {
    let cx = remote_context(traceparent)?;
    Some(cx.span().span_context().trace_id().to_string())
}

/// A sampled `traceparent` with a random span id under `trace_id` (32 lowercase hex digits, not all
/// zero); `None` when the trace id is malformed or no randomness is available.
pub fn fresh_traceparent(trace_id: &str) -> Option<String> {
    let valid = trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && trace_id.bytes().any(|b| b != b'0');
    if !valid {
        return None;
    }
    let mut span = [0u8; 8];
    getrandom::fill(&mut span).ok()?;
    // An all-zero span id is invalid in W3C trace context.
    span[0] |= 1;
    Some(format!("00-{trace_id}-{}-01", hex::encode(span)))
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
    fn nothing_is_exported_without_an_endpoint() {
        let s = OtlpSettings::from_vars(vars(&[("OTEL_SERVICE_NAME", "x")]), "d").unwrap();
        assert_eq!(s, None);
        let s =
            OtlpSettings::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), "d").unwrap();
        assert_eq!(s, None, "an empty endpoint is no endpoint");
    }

    #[test]
    fn protocol_timeout_and_service_name_come_from_the_standard_variables() {
        let s = OtlpSettings::from_vars(
            vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]),
            "agentplane-worker",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf, "the OTLP default");
        assert_eq!(s.timeout, DEFAULT_EXPORT_TIMEOUT);
        assert_eq!(s.default_service_name.as_deref(), Some("agentplane-worker"));

        let s = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_SERVICE_NAME", "mine"),
            ]),
            "d",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.protocol, Protocol::Grpc, "the traces variable wins");
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert_eq!(
            s.default_service_name, None,
            "the SDK reads OTEL_SERVICE_NAME"
        );

        let s = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_RESOURCE_ATTRIBUTES", "team=a, service.name=b"),
            ]),
            "d",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.default_service_name, None);
    }

    #[test]
    fn unsupported_settings_are_errors_that_name_the_variable() {
        let e = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ]),
            "d",
        )
        .unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
        let e = OtlpSettings::from_vars(
            vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ]),
            "d",
        )
        .unwrap_err();
        assert!(e.to_string().contains("OTEL_EXPORTER_OTLP_TIMEOUT"), "{e}");
    }

    #[test]
    fn traceparents_are_parsed_strictly() {
        assert_eq!(
            trace_id_in(TP).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01",
        ] {
            assert!(remote_context(bad).is_none(), "{bad:?}");
        }
        // A later version may append fields.
        assert!(
            remote_context("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x").is_some()
        );
    }

    #[test]
    fn fresh_traceparents_stay_in_the_trace() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        let a = fresh_traceparent(id).unwrap();
        let b = fresh_traceparent(id).unwrap();
        assert_ne!(a, b, "a new span id each time");
        assert_eq!(trace_id_in(&a).as_deref(), Some(id));
        assert!(a.ends_with("-01"), "sampled: {a}");
        assert_eq!(fresh_traceparent("0af7651916CD43DD8448EB211C80319C"), None);
        assert_eq!(fresh_traceparent(&"0".repeat(32)), None);
        assert_eq!(fresh_traceparent("nope"), None);
    }

    #[test]
    fn without_the_layer_hops_carry_the_trace_id_with_fresh_span_ids() {
        // No subscriber in this test: spans are not traced, so the helpers fall back.
        let span = tracing::info_span!("hop");
        let id = "0af7651916cd43dd8448eb211c80319c";
        assert!(!set_remote_parent(&span, TP));
        assert_eq!(traceparent_of(&span), None);
        let tp = hop_traceparent(&span, id).unwrap();
        assert_eq!(trace_id_in(&tp).as_deref(), Some(id));
        assert_ne!(tp, TP);
        assert_eq!(hop_traceparent(&span, "nope"), None);
    }

    #[test]
    fn with_the_layer_hops_are_children_of_the_previous_hop() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let id = "0af7651916cd43dd8448eb211c80319c";
            let span = tracing::info_span!("hop");
            join_trace(&span, id, Some(TP));
            let tp = traceparent_of(&span).unwrap();
            assert_eq!(trace_id_in(&tp).as_deref(), Some(id));
            assert!(!tp.contains("b7ad6b7169203331"), "its own span id: {tp}");
            assert_eq!(hop_traceparent(&span, id), Some(tp.clone()));

            // A child entered under it is in the same trace without being told.
            let _in = span.enter();
            let child = tracing::info_span!("child");
            join_trace(&child, id, None);
            assert_eq!(trace_id_of(&child).as_deref(), Some(id));

            // Only a trace id known (the embedded store): a stand-in parent in that trace.
            let other = "1af7651916cd43dd8448eb211c80319c";
            let lone = tracing::info_span!(parent: None, "lone");
            join_trace(&lone, other, Some(TP));
            assert_eq!(trace_id_of(&lone).as_deref(), Some(other));
        });
    }

    #[test]
    fn headers_parent_spans() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let mut headers = axum::http::HeaderMap::new();
            headers.insert(TRACEPARENT, TP.parse().unwrap());
            let span = tracing::info_span!("server");
            assert!(set_parent_from_headers(&span, &headers));
            assert_eq!(
                trace_id_of(&span).as_deref(),
                Some("0af7651916cd43dd8448eb211c80319c")
            );
            let span = tracing::info_span!("server");
            assert!(!set_parent_from_headers(
                &span,
                &axum::http::HeaderMap::new()
            ));
        });
    }
}
