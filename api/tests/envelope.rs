//! The signed-intent envelope against good and hostile input: every refusal is a typed error, never a panic.

use agentplane_api::envelope::{
    DeviceKey, Envelope, EnvelopeError, INTENT_PAYLOAD_TYPE, MAX_PAYLOAD_BYTES, encode_public_key,
    parse_public_key,
};
use agentplane_api::intent::{Consent, Intent, IntentPayload, PrivacyLevel, RequiredResources};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use jiff::Timestamp;
use proptest::prelude::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn device_key(id: &str, sk: &SigningKey) -> DeviceKey {
    DeviceKey {
        id: id.into(),
        key: sk.verifying_key(),
        not_after: None,
    }
}

fn now() -> Timestamp {
    "2026-11-24T09:00:00Z".parse().unwrap()
}

fn payload() -> IntentPayload {
    IntentPayload {
        v: 1,
        task_id: "0190f7a2-1c2d-7e3f-8a9b-0c1d2e3f4a5b".into(),
        device_id: "kiosk-1".into(),
        user_id: "alice".into(),
        seq: 7,
        created_at: "2026-11-24T08:00:00Z".parse().unwrap(),
        consent: Consent {
            granted_at: "2026-11-24T07:59:00Z".parse().unwrap(),
            scopes: vec!["model".into()],
        },
        intent: Intent {
            kind: "summarize".into(),
            prompt: "summarise my day".into(),
            params: Default::default(),
        },
        privacy_level: PrivacyLevel::Regulated,
        required_resources: RequiredResources {
            gpu: 1,
            model: Some("large".into()),
        },
    }
}

fn signed() -> Envelope {
    Envelope::sign_intent(&payload(), "k1", &key(1)).unwrap()
}

fn verify(env: &Envelope) -> Result<agentplane_api::VerifiedIntent, EnvelopeError> {
    env.verify("kiosk-1", &[device_key("k1", &key(1))], now())
}

/// An envelope signed before `requiredResources.gpu` became a count carries `"gpu": true`: the
/// signature covers those exact bytes, so it must still verify, and the payload reads as one GPU.
#[test]
fn an_envelope_signed_with_the_boolean_gpu_still_verifies_and_reads_as_a_count() {
    for (old, count) in [("true", 1), ("false", 0)] {
        let mut v = serde_json::to_value(payload()).unwrap();
        v["requiredResources"]["gpu"] = serde_json::from_str(old).unwrap();
        let bytes = serde_json::to_vec(&v).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(&format!("\"gpu\":{old}")));
        let env = Envelope::sign_bytes(INTENT_PAYLOAD_TYPE, &bytes, "k1", &key(1)).unwrap();
        let verified = verify(&env).unwrap();
        assert_eq!(verified.payload.required_resources.gpu, count);
        assert_eq!(
            verified.payload_bytes, bytes,
            "the signed bytes are kept verbatim"
        );
    }
}

#[test]
fn round_trip_through_json() {
    let env = signed();
    let json = serde_json::to_vec(&env).unwrap();
    let parsed = Envelope::parse(&json).unwrap();
    assert_eq!(parsed, env);
    let verified = verify(&parsed).unwrap();
    assert_eq!(verified.payload, payload());
    assert_eq!(verified.key_id, "k1");
    assert_eq!(verified.payload_bytes, B64.decode(&env.payload).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["payloadType"], INTENT_PAYLOAD_TYPE);
    assert_eq!(v["signatures"][0]["keyid"], "k1");
}

#[test]
fn pae_matches_the_dsse_spec_example() {
    // The DSSE protocol document's worked example.
    let got = agentplane_api::envelope::pae("http://example.com/HelloWorld", b"hello world");
    assert_eq!(
        got,
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    );
}

#[test]
fn tampered_payload_is_a_bad_signature() {
    let mut env = signed();
    let mut p = payload();
    p.intent.prompt = "wire money".into();
    env.payload = B64.encode(serde_json::to_vec(&p).unwrap());
    assert!(
        matches!(verify(&env), Err(EnvelopeError::BadSignature)),
        "{:?}",
        verify(&env)
    );
}

#[test]
fn wrong_key_is_a_bad_signature() {
    let env = Envelope::sign_intent(&payload(), "k1", &key(2)).unwrap();
    assert!(matches!(verify(&env), Err(EnvelopeError::BadSignature)));
}

#[test]
fn keyid_alone_is_never_trusted() {
    // The attacker names the device's key id but signs with their own key.
    let env = Envelope::sign_intent(&payload(), "k1", &key(9)).unwrap();
    assert!(matches!(verify(&env), Err(EnvelopeError::BadSignature)));
    // A keyid the device does not have.
    let env = Envelope::sign_intent(&payload(), "k-other", &key(1)).unwrap();
    assert!(matches!(
        verify(&env),
        Err(EnvelopeError::UnknownKey { .. })
    ));
}

#[test]
fn empty_keyid_tries_every_device_key() {
    let env = Envelope::sign_intent(&payload(), "", &key(3)).unwrap();
    let keys = [device_key("k1", &key(1)), device_key("k2", &key(3))];
    assert_eq!(env.verify("kiosk-1", &keys, now()).unwrap().key_id, "k2");
}

#[test]
fn truncated_signature() {
    let mut env = signed();
    let raw = B64.decode(&env.signatures[0].sig).unwrap();
    env.signatures[0].sig = B64.encode(&raw[..40]);
    assert!(matches!(
        verify(&env),
        Err(EnvelopeError::SignatureLength { index: 0, len: 40 })
    ));
}

#[test]
fn non_base64_signature_and_payload() {
    let mut env = signed();
    env.signatures[0].sig = "not*base64!".into();
    assert!(matches!(
        verify(&env),
        Err(EnvelopeError::SignatureEncoding { index: 0, .. })
    ));
    let mut env = signed();
    env.payload = "%%%".into();
    assert!(matches!(
        verify(&env),
        Err(EnvelopeError::PayloadEncoding(_))
    ));
}

#[test]
fn wrong_payload_type() {
    let mut env = signed();
    env.payload_type = "application/vnd.in-toto+json".into();
    let err = verify(&env).unwrap_err();
    assert!(matches!(err, EnvelopeError::WrongPayloadType { .. }));
    assert!(err.to_string().contains("application/vnd.in-toto+json"));
}

#[test]
fn no_signatures() {
    let mut env = signed();
    env.signatures.clear();
    assert!(matches!(verify(&env), Err(EnvelopeError::NoSignatures)));
}

#[test]
fn payload_over_one_mebibyte() {
    let big = vec![b'a'; MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(
        Envelope::sign_bytes(INTENT_PAYLOAD_TYPE, &big, "k1", &key(1)),
        Err(EnvelopeError::PayloadTooLarge { .. })
    ));
    let mut env = signed();
    env.payload = B64.encode(&big);
    assert!(matches!(
        verify(&env),
        Err(EnvelopeError::PayloadTooLarge { .. })
    ));
    let json = serde_json::to_vec(&env).unwrap();
    // Still parses (the envelope limit leaves room), but never decodes past the payload limit.
    assert!(matches!(
        Envelope::parse(&json).unwrap().peek_intent(),
        Err(EnvelopeError::PayloadTooLarge { .. })
    ));
    let huge = vec![b' '; 4 << 20];
    assert!(matches!(
        Envelope::parse(&huge),
        Err(EnvelopeError::EnvelopeTooLarge { .. })
    ));
}

#[test]
fn non_utf8_json_payload_is_refused_after_a_valid_signature() {
    let bytes = b"{\"v\":1,\"taskId\":\"\xff\xfe\"}";
    let env = Envelope::sign_bytes(INTENT_PAYLOAD_TYPE, bytes, "k1", &key(1)).unwrap();
    assert!(
        matches!(
            verify(&env),
            Err(EnvelopeError::PayloadNotUtf8 { valid_up_to: 17 })
        ),
        "{:?}",
        verify(&env)
    );
}

#[test]
fn signed_garbage_json_is_a_payload_error() {
    let env = Envelope::sign_bytes(INTENT_PAYLOAD_TYPE, b"{\"v\":1", "k1", &key(1)).unwrap();
    assert!(matches!(verify(&env), Err(EnvelopeError::PayloadJson(_))));
}

#[test]
fn expired_key() {
    let env = signed();
    let mut dk = device_key("k1", &key(1));
    dk.not_after = Some("2026-01-01T00:00:00Z".parse().unwrap());
    let err = env.verify("kiosk-1", &[dk.clone()], now()).unwrap_err();
    assert!(matches!(err, EnvelopeError::KeyExpired { .. }), "{err:?}");
    // Verified as of a moment before expiry (admission time), the same key still verifies.
    env.verify("kiosk-1", &[dk], "2025-12-31T00:00:00Z".parse().unwrap())
        .unwrap();
}

#[test]
fn payload_for_another_device() {
    let env = signed();
    let err = env
        .verify("kiosk-2", &[device_key("k1", &key(1))], now())
        .unwrap_err();
    assert!(matches!(err, EnvelopeError::DeviceMismatch { .. }));
}

#[test]
fn device_without_keys() {
    assert!(matches!(
        signed().verify("kiosk-1", &[], now()),
        Err(EnvelopeError::NoDeviceKeys)
    ));
}

#[test]
fn malformed_envelope_json() {
    for bad in [
        &b""[..],
        b"{",
        b"[]",
        b"{\"payloadType\":1}",
        b"null",
        b"\xff\xff",
    ] {
        assert!(
            matches!(Envelope::parse(bad), Err(EnvelopeError::EnvelopeJson(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn public_key_encoding() {
    let vk = key(1).verifying_key();
    let text = encode_public_key(&vk);
    assert_eq!(parse_public_key("k1", &text).unwrap(), vk);
    assert!(matches!(
        parse_public_key("k1", "AAAA"),
        Err(EnvelopeError::InvalidKey { .. })
    ));
    assert!(matches!(
        parse_public_key("k1", "!!"),
        Err(EnvelopeError::InvalidKey { .. })
    ));
}

#[test]
fn every_error_has_a_stable_code() {
    let mut env = signed();
    env.signatures.clear();
    assert_eq!(verify(&env).unwrap_err().code(), "bad_signatures");
    let env = Envelope::sign_intent(&payload(), "k1", &key(2)).unwrap();
    assert_eq!(verify(&env).unwrap_err().code(), "bad_signature");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Arbitrary bytes never panic the parser or the verifier.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(env) = Envelope::parse(&bytes) {
            let _ = env.peek_intent();
            let _ = verify(&env);
        }
    }

    /// Arbitrary envelope fields never panic and never verify.
    #[test]
    fn arbitrary_fields_never_verify(payload_type in ".{0,64}", payload in "[A-Za-z0-9+/=]{0,256}", sig in "[A-Za-z0-9+/=]{0,120}", keyid in "[a-z0-9]{0,4}") {
        let env = Envelope {
            payload_type,
            payload,
            signatures: vec![agentplane_api::EnvelopeSignature { keyid, sig }],
        };
        prop_assert!(verify(&env).is_err());
    }

    /// Flipping any bit of a signed payload breaks verification.
    #[test]
    fn any_bit_flip_in_the_payload_is_detected(byte in 0usize..200, bit in 0u8..8) {
        let env = signed();
        let mut raw = B64.decode(&env.payload).unwrap();
        let i = byte % raw.len();
        raw[i] ^= 1 << bit;
        let tampered = Envelope { payload: B64.encode(&raw), ..env };
        prop_assert!(verify(&tampered).is_err());
    }

    /// Any signature bit flip is detected as well.
    #[test]
    fn any_bit_flip_in_the_signature_is_detected(byte in 0usize..64, bit in 0u8..8) {
        let mut env = signed();
        let mut raw = B64.decode(&env.signatures[0].sig).unwrap();
        raw[byte] ^= 1 << bit;
        env.signatures[0].sig = B64.encode(&raw);
        prop_assert!(verify(&env).is_err());
    }
}
