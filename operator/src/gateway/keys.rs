//! `POST /v1/devices/{id}/keys`: a device adds a key (rotation) by proving it holds a registered key
//! and the new one. Both signatures cover [`add_key_message`]: the device, the new key, the time and
//! the retirement asked for, so neither a captured request nor a key the device does not hold can be
//! added. Optionally the signing key is retired after a grace period (its `notAfter`), long enough
//! for envelopes it signed while offline to arrive: the operator checks keys as of admission.

use agentplane_api::KeyAlgorithm;
use agentplane_api::device::MAX_DEVICE_KEYS;
use agentplane_api::envelope::parse_public_key;
use agentplane_api::wire::{
    AddKeyRequest, AddKeyResponse, MAX_RETIRE_AFTER_SECS, READ_AUTH_MAX_SKEW_SECS, add_key_message,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signature;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::AppState;
use super::error::ApiError;
use super::handlers::{json_body, parse_json};
use crate::store::StoreError;

/// Read-modify-write attempts before giving up on a device that keeps changing (each admission
/// moves its status, hence its version, in the embedded store).
const ATTEMPTS: usize = 5;

pub async fn add_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = add_key_inner(&state, &id, &headers, body).await;
    let outcome = match &result {
        Ok((StatusCode::CREATED, _)) => "added",
        Ok(_) => "already_registered",
        Err(e) => e.code,
    };
    state
        .metrics
        .inc("agentplane_key_rotations_total", &[("outcome", outcome)]);
    let (status, body) = result?;
    Ok((status, Json(body)).into_response())
}

fn signature(field: &str, b64: &str) -> Result<Signature, ApiError> {
    let bytes = B64.decode(b64.trim()).map_err(|e| {
        ApiError::bad_request("invalid_request", format!("{field}: not base64: {e}"))
    })?;
    Signature::from_slice(&bytes).map_err(|_| {
        ApiError::bad_request(
            "invalid_request",
            format!("{field}: an Ed25519 signature is 64 bytes"),
        )
    })
}

async fn add_key_inner(
    state: &AppState,
    device_id: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, AddKeyResponse), ApiError> {
    let req: AddKeyRequest = parse_json(&json_body(headers, body)?)?;
    let key = &req.public_key;
    if key.id.is_empty() || key.id.len() > 128 || key.alg != KeyAlgorithm::Ed25519 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "publicKey.id must be 1 to 128 bytes, alg ed25519",
        ));
    }
    let new_key = parse_public_key(&key.id, &key.key)
        .map_err(|e| ApiError::bad_request("invalid_public_key", e.to_string()))?;
    if req
        .retire_signing_key_after_secs
        .is_some_and(|s| s > MAX_RETIRE_AFTER_SECS)
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("retireSigningKeyAfterSecs must be at most {MAX_RETIRE_AFTER_SECS}"),
        ));
    }
    let now = Timestamp::now();
    if now.as_second().abs_diff(req.ts) > READ_AUTH_MAX_SKEW_SECS.unsigned_abs() {
        return Err(ApiError::unauthorized(
            "clock_skew",
            format!(
                "request time {} is more than {READ_AUTH_MAX_SKEW_SECS} s from the gateway's clock; see serverTime",
                req.ts
            ),
        ));
    }
    let message = add_key_message(device_id, key, req.ts, req.retire_signing_key_after_secs);
    let sig = signature("signature", &req.signature)?;
    let proof = signature("proof", &req.proof)?;

    for _ in 0..ATTEMPTS {
        let Some(device) = state.store.get_device(device_id).await? else {
            return Err(ApiError::not_found(format!(
                "device {device_id:?} is not registered"
            )));
        };
        if device.spec.revoked {
            return Err(ApiError::forbidden(
                "device_revoked",
                format!("device {device_id:?} is revoked"),
            ));
        }
        let keys = device
            .spec
            .device_keys()
            .map_err(|e| ApiError::internal(format!("device {device_id:?} has a bad key: {e}")))?;
        let signer = keys.iter().find(|k| k.id == req.signed_by).ok_or_else(|| {
            ApiError::unauthorized(
                "unknown_key",
                format!("key {:?} is not registered for this device", req.signed_by),
            )
        })?;
        if signer.not_after.is_some_and(|t| t < now) {
            return Err(ApiError::unauthorized(
                "key_expired",
                format!("key {:?} is past its notAfter", req.signed_by),
            ));
        }
        signer.key.verify_strict(&message, &sig).map_err(|_| {
            ApiError::unauthorized("bad_signature", "signature does not verify with signedBy")
        })?;
        new_key.verify_strict(&message, &proof).map_err(|_| {
            ApiError::bad_request("bad_proof", "proof does not verify with the new key")
        })?;

        let mut spec = device.spec.clone();
        let already = match spec.public_keys.iter().find(|k| k.id == key.id) {
            Some(existing) if existing.key.trim() == key.key.trim() => true,
            Some(_) => {
                return Err(ApiError::conflict(
                    "key_id_taken",
                    format!("key id {:?} is registered with another key", key.id),
                ));
            }
            None => false,
        };
        if !already {
            if spec.public_keys.len() >= MAX_DEVICE_KEYS {
                return Err(ApiError::conflict(
                    "too_many_keys",
                    format!(
                        "the device has {MAX_DEVICE_KEYS} keys; retire one before adding another"
                    ),
                ));
            }
            spec.public_keys.push(key.clone());
        }
        if let Some(after) = req.retire_signing_key_after_secs {
            let at = now
                .checked_add(jiff::SignedDuration::from_secs(after as i64))
                .unwrap_or(now);
            if let Some(k) = spec.public_keys.iter_mut().find(|k| k.id == req.signed_by)
                && k.id != key.id
            {
                // Never extend an earlier retirement.
                let earlier = k.not_after.as_ref().is_some_and(|t| t.0 <= at);
                if !earlier {
                    k.not_after = Some(Time(at));
                }
            }
        }
        let response = |d: &crate::store::DeviceRecord| AddKeyResponse {
            device_id: d.name.clone(),
            key_ids: d.spec.public_keys.iter().map(|k| k.id.clone()).collect(),
            already_registered: already,
        };
        if spec == device.spec {
            return Ok((StatusCode::OK, response(&device)));
        }
        match state
            .store
            .update_device_spec(device_id, &device.version, spec)
            .await
        {
            Ok(updated) => {
                tracing::info!(device = %device_id, key = %key.id, "device key added");
                let status = if already {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                };
                return Ok((status, response(&updated)));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(
        "device_busy",
        "the device record kept changing; retry",
    ))
}
