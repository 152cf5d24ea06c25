//! The approver console: `GET /approvals`, a small page (HTML, one script, one stylesheet, all
//! compiled into the binary; no framework, nothing fetched from elsewhere) over the approvals API.
//!
//! The page holds no authority of its own: the approver pastes their bearer credential, the script
//! keeps it in memory only (never in storage or a cookie, so no other page can ride on it), and every
//! call is the same `/v1` request the CLI makes. The script is a separate file so the
//! Content-Security-Policy can forbid inline script outright.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;

const PAGE_HTML: &str = include_str!("../../console/approvals.html");
const PAGE_JS: &str = include_str!("../../console/approvals.js");
const PAGE_CSS: &str = include_str!("../../console/approvals.css");

/// Same-origin everything, no inline script or style, no framing, no form posts elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes, merged into the gateway's router (they are not part of the `/v1` API or
/// its OpenAPI document).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/approvals",
            get(|| async { asset("text/html; charset=utf-8", PAGE_HTML) }),
        )
        .route(
            "/approvals.js",
            get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }),
        )
        .route(
            "/approvals.css",
            get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }),
        )
        // Browsers ask for it on their own; an empty answer keeps a 404 out of the console.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
