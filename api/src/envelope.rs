//! The signed intent: a DSSE envelope (payload type + base64 payload + Ed25519 signatures over the
//! DSSE pre-authentication encoding). Verification takes its keys from the device record, never from
//! the envelope: `keyid` only narrows which of the device's keys to try.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::intent::{IntentPayload, InvalidField};

/// The only payload type an agentplane gateway or operator accepts.
pub const INTENT_PAYLOAD_TYPE: &str = "application/vnd.agentplane.intent.v1+json";

/// Largest decoded payload accepted.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Largest base64 payload: the encoding of `MAX_PAYLOAD_BYTES`, checked before decoding anything.
pub const MAX_PAYLOAD_B64_LEN: usize = MAX_PAYLOAD_BYTES.div_ceil(3) * 4;

/// Largest serialized envelope accepted by `Envelope::parse` (payload plus generous room for signatures).
pub const MAX_ENVELOPE_BYTES: usize = MAX_PAYLOAD_B64_LEN + 64 * 1024;

/// More signatures than this is not a device's envelope; refuse instead of trying them all.
pub const MAX_SIGNATURES: usize = 8;

/// One DSSE signature.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeSignature {
    /// A hint naming one of the device's registered keys; may be empty.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub keyid: String,
    /// Standard base64 of the 64-byte Ed25519 signature over the PAE.
    #[schemars(length(max = 128))]
    pub sig: String,
}

/// A DSSE envelope as sent by a device and stored verbatim in the AgentTask.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    #[schemars(length(max = 128))]
    pub payload_type: String,
    /// Standard base64 of the payload bytes exactly as signed.
    #[schemars(length(max = 1_398_104))]
    pub payload: String,
    #[schemars(length(max = 8))]
    pub signatures: Vec<EnvelopeSignature>,
}

/// A device key as registered in its `EdgeDevice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKey {
    pub id: String,
    pub key: VerifyingKey,
    /// The key is refused for envelopes verified after this instant.
    pub not_after: Option<Timestamp>,
}

/// An envelope whose signature checked out against a device key, with its decoded payload.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedIntent {
    pub payload: IntentPayload,
    /// The id of the device key that verified the signature.
    pub key_id: String,
    /// The payload bytes exactly as signed.
    pub payload_bytes: Vec<u8>,
}

/// Why an envelope was refused. Every variant is a client error: nothing here is a server fault.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is {size} bytes, over the {limit}-byte limit")]
    EnvelopeTooLarge { size: usize, limit: usize },
    #[error("envelope is not valid JSON: {0}")]
    EnvelopeJson(#[source] serde_json::Error),
    #[error("payloadType is {found:?}, expected {expected:?}")]
    WrongPayloadType {
        expected: &'static str,
        found: String,
    },
    #[error("envelope has no signatures")]
    NoSignatures,
    #[error("envelope has {count} signatures, at most {MAX_SIGNATURES} are accepted")]
    TooManySignatures { count: usize },
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("payload is not valid standard base64: {0}")]
    PayloadEncoding(#[source] base64::DecodeError),
    #[error("signature {index} is not valid standard base64: {source}")]
    SignatureEncoding {
        index: usize,
        #[source]
        source: base64::DecodeError,
    },
    #[error("signature {index} is {len} bytes, an Ed25519 signature is 64")]
    SignatureLength { index: usize, len: usize },
    #[error("the device has no registered keys")]
    NoDeviceKeys,
    #[error("no signature names a key registered for the device (keyids: {keyids:?})")]
    UnknownKey { keyids: Vec<String> },
    #[error("device key {key_id:?} expired at {not_after}")]
    KeyExpired {
        key_id: String,
        not_after: Timestamp,
    },
    #[error("signature does not verify against the device's registered key")]
    BadSignature,
    #[error("registered key {key_id:?} is not a valid Ed25519 public key: {reason}")]
    InvalidKey { key_id: String, reason: String },
    #[error("payload is not UTF-8 (invalid byte at offset {valid_up_to})")]
    PayloadNotUtf8 { valid_up_to: usize },
    #[error("payload is not a valid intent: {0}")]
    PayloadJson(#[source] serde_json::Error),
    #[error(transparent)]
    InvalidPayload(#[from] InvalidField),
    #[error("payload names device {found:?} but was submitted for device {expected:?}")]
    DeviceMismatch { expected: String, found: String },
}

impl EnvelopeError {
    /// A short stable code for JSON errors and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::EnvelopeTooLarge { .. } | EnvelopeError::PayloadTooLarge { .. } => {
                "too_large"
            }
            EnvelopeError::EnvelopeJson(_) => "malformed_envelope",
            EnvelopeError::WrongPayloadType { .. } => "wrong_payload_type",
            EnvelopeError::NoSignatures | EnvelopeError::TooManySignatures { .. } => {
                "bad_signatures"
            }
            EnvelopeError::PayloadEncoding(_) => "malformed_payload",
            EnvelopeError::SignatureEncoding { .. } | EnvelopeError::SignatureLength { .. } => {
                "malformed_signature"
            }
            EnvelopeError::NoDeviceKeys | EnvelopeError::UnknownKey { .. } => "unknown_key",
            EnvelopeError::KeyExpired { .. } => "key_expired",
            EnvelopeError::BadSignature => "bad_signature",
            EnvelopeError::InvalidKey { .. } => "invalid_device_key",
            EnvelopeError::PayloadNotUtf8 { .. } | EnvelopeError::PayloadJson(_) => {
                "malformed_payload"
            }
            EnvelopeError::InvalidPayload(_) => "invalid_payload",
            EnvelopeError::DeviceMismatch { .. } => "device_mismatch",
        }
    }
}

/// DSSE v1 pre-authentication encoding: `"DSSEv1" SP len(type) SP type SP len(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Serializes the payload and signs it. The bytes signed are the bytes carried.
    pub fn sign_intent(
        payload: &IntentPayload,
        key_id: &str,
        key: &SigningKey,
    ) -> Result<Self, EnvelopeError> {
        payload.validate()?;
        let bytes = serde_json::to_vec(payload).map_err(EnvelopeError::PayloadJson)?;
        Self::sign_bytes(INTENT_PAYLOAD_TYPE, &bytes, key_id, key)
    }

    /// Signs arbitrary payload bytes under a payload type.
    pub fn sign_bytes(
        payload_type: &str,
        payload: &[u8],
        key_id: &str,
        key: &SigningKey,
    ) -> Result<Self, EnvelopeError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(EnvelopeError::PayloadTooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let sig = key.sign(&pae(payload_type, payload));
        Ok(Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: vec![EnvelopeSignature {
                keyid: key_id.to_owned(),
                sig: B64.encode(sig.to_bytes()),
            }],
        })
    }

    /// Parses an envelope from untrusted JSON bytes, refusing oversized input before parsing.
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::EnvelopeTooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        serde_json::from_slice(bytes).map_err(EnvelopeError::EnvelopeJson)
    }

    /// Decodes the payload bytes, refusing oversized payloads before decoding.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        if self.payload.len() > MAX_PAYLOAD_B64_LEN {
            // Report the decoded size the client would have sent, not the base64 length.
            return Err(EnvelopeError::PayloadTooLarge {
                size: self.payload.len() / 4 * 3,
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let bytes = B64
            .decode(&self.payload)
            .map_err(EnvelopeError::PayloadEncoding)?;
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(EnvelopeError::PayloadTooLarge {
                size: bytes.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Reads the payload WITHOUT checking any signature, so the caller can find the device whose keys
    /// then verify it. Nothing read here may be trusted before `verify` succeeds.
    pub fn peek_intent(&self) -> Result<IntentPayload, EnvelopeError> {
        self.check_shape()?;
        decode_intent(&self.payload_bytes()?)
    }

    /// Verifies the envelope against the keys registered for `device_id`, as of `at` (the moment of
    /// admission: a key valid then keeps verifying the task after it expires).
    pub fn verify(
        &self,
        device_id: &str,
        keys: &[DeviceKey],
        at: Timestamp,
    ) -> Result<VerifiedIntent, EnvelopeError> {
        self.check_shape()?;
        if keys.is_empty() {
            return Err(EnvelopeError::NoDeviceKeys);
        }
        let payload_bytes = self.payload_bytes()?;
        let message = pae(&self.payload_type, &payload_bytes);

        let mut expired: Option<(String, Timestamp)> = None;
        let mut tried_in_date_key = false;
        for (index, signature) in self.signatures.iter().enumerate() {
            let sig = decode_signature(index, &signature.sig)?;
            let candidates = keys
                .iter()
                .filter(|k| signature.keyid.is_empty() || k.id == signature.keyid);
            for key in candidates {
                if let Some(not_after) = key.not_after
                    && at > not_after
                {
                    expired.get_or_insert((key.id.clone(), not_after));
                    continue;
                }
                tried_in_date_key = true;
                if key.key.verify_strict(&message, &sig).is_ok() {
                    let payload = decode_intent(&payload_bytes)?;
                    if payload.device_id != device_id {
                        return Err(EnvelopeError::DeviceMismatch {
                            expected: device_id.to_owned(),
                            found: payload.device_id,
                        });
                    }
                    return Ok(VerifiedIntent {
                        payload,
                        key_id: key.id.clone(),
                        payload_bytes,
                    });
                }
            }
        }
        if tried_in_date_key {
            return Err(EnvelopeError::BadSignature);
        }
        if let Some((key_id, not_after)) = expired {
            return Err(EnvelopeError::KeyExpired { key_id, not_after });
        }
        Err(EnvelopeError::UnknownKey {
            keyids: self.signatures.iter().map(|s| s.keyid.clone()).collect(),
        })
    }

    fn check_shape(&self) -> Result<(), EnvelopeError> {
        if self.payload_type != INTENT_PAYLOAD_TYPE {
            return Err(EnvelopeError::WrongPayloadType {
                expected: INTENT_PAYLOAD_TYPE,
                found: self.payload_type.chars().take(128).collect(),
            });
        }
        match self.signatures.len() {
            0 => Err(EnvelopeError::NoSignatures),
            n if n > MAX_SIGNATURES => Err(EnvelopeError::TooManySignatures { count: n }),
            _ => Ok(()),
        }
    }
}

fn decode_signature(index: usize, sig: &str) -> Result<Signature, EnvelopeError> {
    // A 64-byte signature is 88 base64 characters; anything much longer is refused before decoding.
    if sig.len() > 128 {
        return Err(EnvelopeError::SignatureLength {
            index,
            len: sig.len() / 4 * 3,
        });
    }
    let bytes = B64
        .decode(sig)
        .map_err(|source| EnvelopeError::SignatureEncoding { index, source })?;
    let arr: [u8; 64] =
        bytes
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::SignatureLength {
                index,
                len: bytes.len(),
            })?;
    Ok(Signature::from_bytes(&arr))
}

fn decode_intent(bytes: &[u8]) -> Result<IntentPayload, EnvelopeError> {
    let text = std::str::from_utf8(bytes).map_err(|e| EnvelopeError::PayloadNotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let payload: IntentPayload = serde_json::from_str(text).map_err(EnvelopeError::PayloadJson)?;
    payload.validate()?;
    Ok(payload)
}

/// Parses a registered public key: standard base64 of the 32 raw Ed25519 bytes.
pub fn parse_public_key(key_id: &str, encoded: &str) -> Result<VerifyingKey, EnvelopeError> {
    let invalid = |reason: String| EnvelopeError::InvalidKey {
        key_id: key_id.to_owned(),
        reason,
    };
    let bytes = B64
        .decode(encoded.trim())
        .map_err(|e| invalid(format!("not standard base64: {e}")))?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        invalid(format!(
            "{} bytes, an Ed25519 public key is 32",
            bytes.len()
        ))
    })?;
    VerifyingKey::from_bytes(&arr).map_err(|e| invalid(e.to_string()))
}

/// Encodes a public key the way `EdgeDevice.spec.publicKeys[].key` holds it.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}
