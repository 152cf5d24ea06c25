//! The device gateway: the HTTP API devices and approvers talk to (axum). The router is the same for
//! `agentplane dev` and the distributed `agentplane gateway`; only the store behind it differs.

pub mod auth;
pub mod console;
pub mod error;
pub mod events;
pub mod handlers;
pub mod keys;
pub mod openapi;
pub mod serve;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::DynStore;
pub use auth::ApproverCredential;
use error::ApiError;

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Largest request body accepted (an envelope's payload limit plus room for the signature).
    pub max_body_bytes: usize,
    /// Longest a request may take from its headers to the response headers, body upload included:
    /// a slow body is answered 408 instead of holding a connection and a task forever.
    pub request_timeout: Duration,
    /// Approver credentials (bearer tokens, kept as hashes).
    pub approvers: Vec<ApproverCredential>,
    /// Fallback re-read interval of event streams, should a change notification be missed.
    pub sse_poll: Duration,
    /// Requests handled at once; beyond this the gateway sheds load with 503 and Retry-After.
    pub max_in_flight: usize,
    /// Open event streams at once; beyond this new streams get 503 (clients fall back to polling).
    pub max_event_streams: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 2 * 1024 * 1024,
            request_timeout: Duration::from_secs(15),
            approvers: Vec::new(),
            sse_poll: Duration::from_secs(1),
            max_in_flight: 1024,
            max_event_streams: 1024,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: DynStore,
    pub metrics: Arc<Metrics>,
    pub config: Arc<GatewayConfig>,
    pub limits: Arc<Limits>,
    pub events: Arc<events::EventHub>,
    /// The AgentPolicy's Rego modules, compiled once per version (issue 16).
    pub rego: Arc<crate::policy::rego::RegoPolicies>,
}

/// The gateway's concurrency bounds.
pub struct Limits {
    pub requests: Arc<Semaphore>,
    pub event_streams: Arc<Semaphore>,
}

impl AppState {
    /// Builds the state and starts the event hub, which runs until `shutdown`.
    pub fn new(
        store: DynStore,
        metrics: Arc<Metrics>,
        config: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let events = events::EventHub::start(&store, shutdown);
        let limits = Arc::new(Limits {
            requests: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            event_streams: Arc::new(Semaphore::new(config.max_event_streams.max(1))),
        });
        AppState {
            store,
            metrics,
            config: Arc::new(config),
            limits,
            events,
            rego: Arc::default(),
        }
    }
}

/// 503 with Retry-After: the gateway is at one of its bounds.
pub fn overloaded(what: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("too many {what} at once; retry shortly"),
    );
    e.retry_after_secs = Some(1);
    e
}

/// Every route: (path, methods, handler). The router is built from this table and the OpenAPI test
/// checks the document against it, so the two cannot drift apart.
pub fn routes() -> Vec<(
    &'static str,
    &'static [&'static str],
    MethodRouter<AppState>,
)> {
    vec![
        ("/v1/intents", &["post"], post(handlers::submit_intent)),
        ("/v1/tasks/{id}", &["get"], get(handlers::get_task)),
        (
            "/v1/tasks/{id}/events",
            &["get"],
            get(handlers::task_events),
        ),
        (
            "/v1/tasks/{id}/cancel",
            &["post"],
            post(handlers::cancel_task),
        ),
        ("/v1/approvals", &["get"], get(handlers::list_approvals)),
        ("/v1/tasks/{id}/approve", &["post"], post(handlers::approve)),
        ("/v1/tasks/{id}/deny", &["post"], post(handlers::deny)),
        ("/v1/devices/enroll", &["post"], post(handlers::enroll)),
        ("/v1/devices/{id}/keys", &["post"], post(keys::add_key)),
        ("/healthz", &["get"], get(handlers::healthz)),
        ("/metrics", &["get"], get(handlers::metrics)),
        ("/openapi.json", &["get"], get(handlers::openapi)),
    ]
}

pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (path, _, handler) in routes() {
        router = router.route(path, handler);
    }
    router
        .merge(console::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Request timeout (JSON 408) and request metrics around every route.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    // Shed rather than queue: a queued request would only time out later, holding its connection.
    let Ok(_permit) = state.limits.requests.clone().try_acquire_owned() else {
        state.metrics.inc(
            "agentplane_http_requests_total",
            &[("method", method.as_str()), ("status", "503")],
        );
        return overloaded("requests").into_response();
    };
    let resp = match tokio::time::timeout(state.config.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request did not complete within {:?}",
                state.config.request_timeout
            ),
        )
        .into_response(),
    };
    state.metrics.inc(
        "agentplane_http_requests_total",
        &[
            ("method", method.as_str()),
            ("status", resp.status().as_str()),
        ],
    );
    resp
}
