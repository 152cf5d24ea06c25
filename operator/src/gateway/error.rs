//! Structured JSON errors: every non-2xx answer is an [`ErrorBody`].

use agentplane_api::EnvelopeError;
use agentplane_api::wire::{ErrorBody, ErrorDetail};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub server_time: Option<i64>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            server_time: None,
            retry_after_secs: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401, carrying the server's clock so a device with a skewed clock can correct itself.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, code, message);
        e.server_time = Some(jiff::Timestamp::now().as_second());
        e
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// A server-side fault. The detail is logged; the client gets a generic message.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the gateway could not complete the request; retry later",
        );
        err.retry_after_secs = Some(1);
        err
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// Maps an envelope refusal to its HTTP status: shape problems are 400, authentication problems 401.
impl From<EnvelopeError> for ApiError {
    fn from(e: EnvelopeError) -> Self {
        let code = e.code();
        match &e {
            EnvelopeError::EnvelopeTooLarge { .. } | EnvelopeError::PayloadTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code, e.to_string())
            }
            EnvelopeError::NoDeviceKeys
            | EnvelopeError::UnknownKey { .. }
            | EnvelopeError::KeyExpired { .. }
            | EnvelopeError::BadSignature => ApiError::unauthorized(code, e.to_string()),
            EnvelopeError::InvalidKey { .. } => ApiError::internal(e),
            _ => ApiError::bad_request(code, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                server_time: self.server_time,
                retry_after_secs: self.retry_after_secs,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        resp
    }
}
