//! Who is calling: a device proving possession of its key on each read (the signed-read scheme of
//! `agentplane_api::wire`), or an approver presenting a bearer credential.

use agentplane_api::envelope::parse_public_key;
use agentplane_api::wire::{READ_AUTH_MAX_SKEW_SECS, READ_AUTH_SCHEME, read_auth_message};
use axum::http::{HeaderMap, Method, Uri, header::AUTHORIZATION};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signature;

use super::AppState;
use super::error::ApiError;
use crate::store::hash_secret;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Device(String),
    Approver(String),
}

/// An approver's credential as configured: only the token's hash is kept in memory.
#[derive(Clone, Debug)]
pub struct ApproverCredential {
    pub name: String,
    pub token_hash: String,
}

impl ApproverCredential {
    pub fn new(name: impl Into<String>, token: &str) -> Self {
        ApproverCredential {
            name: name.into(),
            token_hash: hash_secret(token),
        }
    }
}

/// The parsed `Agentplane-Ed25519` header fields.
#[derive(Debug, PartialEq, Eq)]
struct SignedRead<'a> {
    device: &'a str,
    key: &'a str,
    ts: i64,
    sig: &'a str,
}

fn parse_signed(params: &str) -> Option<SignedRead<'_>> {
    let (mut device, mut key, mut ts, mut sig) = (None, None, None, None);
    for part in params.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "device" => device = Some(v.trim()),
            "key" => key = Some(v.trim()),
            "ts" => ts = v.trim().parse().ok(),
            "sig" => sig = Some(v.trim()),
            _ => return None,
        }
    }
    Some(SignedRead {
        device: device?,
        key: key?,
        ts: ts?,
        sig: sig?,
    })
}

/// Authenticates a request from its `Authorization` header.
pub async fn authenticate(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing_credentials",
            format!(
                "send `Authorization: {READ_AUTH_SCHEME} ...` (devices) or `Bearer ...` (approvers)"
            ),
        ));
    };
    let value = value.to_str().map_err(|_| {
        ApiError::unauthorized("malformed_credentials", "Authorization is not ASCII")
    })?;
    let (scheme, params) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        let hash = hash_secret(params.trim());
        return state
            .config
            .approvers
            .iter()
            .find(|a| a.token_hash == hash)
            .map(|a| Principal::Approver(a.name.clone()))
            .ok_or_else(|| ApiError::unauthorized("bad_credentials", "unknown bearer credential"));
    }
    if scheme != READ_AUTH_SCHEME {
        return Err(ApiError::unauthorized(
            "malformed_credentials",
            format!("unsupported authorization scheme; use {READ_AUTH_SCHEME} or Bearer"),
        ));
    }
    let signed = parse_signed(params).ok_or_else(|| {
        ApiError::unauthorized(
            "malformed_credentials",
            format!("expected `{READ_AUTH_SCHEME} device=<id>,key=<keyid>,ts=<unix seconds>,sig=<base64>`"),
        )
    })?;
    let now = jiff::Timestamp::now();
    // abs_diff: `ts` is untrusted and may be anywhere in the i64 range.
    if now.as_second().abs_diff(signed.ts) > READ_AUTH_MAX_SKEW_SECS.unsigned_abs() {
        return Err(ApiError::unauthorized(
            "clock_skew",
            format!(
                "request time {} is more than {READ_AUTH_MAX_SKEW_SECS} s from the gateway's clock; see serverTime",
                signed.ts
            ),
        ));
    }
    let device = state
        .store
        .get_device(signed.device)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown_device", "the device is not registered"))?;
    if device.spec.revoked {
        return Err(ApiError::forbidden(
            "device_revoked",
            "the device is revoked",
        ));
    }
    let registered = device
        .spec
        .public_keys
        .iter()
        .find(|k| k.id == signed.key)
        .ok_or_else(|| {
            ApiError::unauthorized("unknown_key", "the key is not registered for the device")
        })?;
    if let Some(not_after) = &registered.not_after
        && now > not_after.0
    {
        return Err(ApiError::unauthorized(
            "key_expired",
            format!("the key expired at {}", not_after.0),
        ));
    }
    let key = parse_public_key(&registered.id, &registered.key).map_err(ApiError::internal)?;
    let sig_bytes = B64
        .decode(signed.sig)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "malformed_credentials",
                "sig is not a base64 Ed25519 signature",
            )
        })?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let message = read_auth_message(method.as_str(), path, signed.ts);
    key.verify_strict(&message, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| {
            ApiError::unauthorized("bad_signature", "the request signature does not verify")
        })?;
    Ok(Principal::Device(device.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_header_fields_in_any_order() {
        let s = parse_signed("ts=12, device=d1,sig=abc,key=k1").unwrap();
        assert_eq!(
            s,
            SignedRead {
                device: "d1",
                key: "k1",
                ts: 12,
                sig: "abc"
            }
        );
        assert!(parse_signed("device=d1,key=k1,ts=x,sig=a").is_none());
        assert!(parse_signed("device=d1,key=k1,sig=a").is_none());
        assert!(parse_signed("device=d1,key=k1,ts=1,sig=a,extra=1").is_none());
        assert!(parse_signed("").is_none());
    }
}
