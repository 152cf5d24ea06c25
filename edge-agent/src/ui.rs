//! The local UI and the small HTTP API it uses, on loopback only.
//!
//! The page and its script are compiled into the binary (no CDN, works offline). Browsers on the device
//! can reach loopback from any web page, so the API checks the `Host` header (defeats DNS rebinding) and
//! only accepts JSON bodies (a cross-site form cannot send one without a CORS preflight we never answer).

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::capture::{CaptureError, Capturer, IntentRequest};
use crate::outbox::{Counts, Entry, RunsOn};
use crate::sender::{Link, LinkState};

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

#[derive(Clone)]
pub struct UiState {
    pub capturer: Capturer,
    pub link: Arc<Link>,
    pub wake: Arc<tokio::sync::Notify>,
    /// Wakes the local model runner.
    pub local_wake: Arc<tokio::sync::Notify>,
    /// `Host` values accepted (e.g. `127.0.0.1:7420`, `localhost:7420`).
    pub allowed_hosts: Arc<Vec<String>>,
}

pub fn router(state: UiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/api/state", get(api_state))
        .route("/api/intents", get(list_intents).post(submit_intent))
        .route("/api/intents/{id}", get(get_intent))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_host,
        ))
        .with_state(state)
}

/// The `Host` values to accept for a listener on `addr`.
pub fn allowed_hosts(addr: std::net::SocketAddr) -> Vec<String> {
    let port = addr.port();
    let mut hosts = vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    let own = addr.to_string();
    if !hosts.contains(&own) {
        hosts.push(own);
    }
    hosts
}

async fn check_host(State(state): State<UiState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !state
        .allowed_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(host))
    {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "bad_host",
            "unexpected Host header",
        );
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    (headers, body).into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}
async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}
async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StateView {
    device_id: String,
    key_id: String,
    link: LinkState,
    counts: Counts,
}

async fn api_state(State(s): State<UiState>) -> Response {
    match s.capturer.outbox.counts().await {
        Ok(counts) => Json(StateView {
            device_id: s.capturer.device_id.clone(),
            key_id: s.capturer.signer.key_id().to_owned(),
            link: s.link.snapshot(),
            counts,
        })
        .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_error",
            &e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_intents(State(s): State<UiState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    match s.capturer.outbox.recent(limit).await {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_error",
            &e.to_string(),
        ),
    }
}

async fn get_intent(State(s): State<UiState>, Path(id): Path<String>) -> Response {
    match s.capturer.outbox.get(&id).await {
        Ok(Some(entry)) => Json::<Entry>(entry).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such intent on this device",
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "outbox_error",
            &e.to_string(),
        ),
    }
}

async fn submit_intent(
    State(s): State<UiState>,
    body: Result<Json<IntentRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(rej) => return error(rej.status(), "invalid_request", &rej.body_text()),
    };
    match s.capturer.capture(req).await {
        Ok(accepted) => {
            match accepted.runs_on {
                RunsOn::Cloud => s.wake.notify_one(),
                RunsOn::Device => s.local_wake.notify_one(),
            }
            (StatusCode::CREATED, Json(accepted)).into_response()
        }
        Err(e) => {
            let status = match &e {
                CaptureError::Invalid(_) => StatusCode::BAD_REQUEST,
                CaptureError::PrivateStaysLocal
                | CaptureError::RegulatedStaysLocal
                | CaptureError::RegulatedRefused => StatusCode::FORBIDDEN,
                CaptureError::Policy(_) => StatusCode::INTERNAL_SERVER_ERROR,
                CaptureError::Outbox(crate::outbox::OutboxError::Full { .. })
                | CaptureError::Outbox(crate::outbox::OutboxError::DiskFull) => {
                    StatusCode::INSUFFICIENT_STORAGE
                }
                CaptureError::Outbox(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.code(), &e.to_string())
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
