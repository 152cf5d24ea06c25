//! KMS envelope encryption for secret values.
//!
//! Sealing asks KMS for a fresh 256-bit data key (`GenerateDataKey`, `AES_256`), encrypts the value
//! locally with ChaCha20-Poly1305 under that key and a random 96-bit nonce, and keeps only the data key
//! as KMS encrypted it. Opening asks KMS to decrypt the data key (`Decrypt`) and authenticates and
//! decrypts the value locally. The plaintext never reaches KMS, and one KMS call opens a value of any size.
//!
//! The **encryption context** is bound twice: KMS binds it to the encrypted data key (Decrypt under
//! another context fails, and CloudTrail records it), and the AEAD binds it as associated data, so
//! the value cannot be moved to another context even by someone who can call Decrypt with any
//! context. [`crate::secrets::KubeKmsSecrets`] uses the Secret's namespace, name and key as the context,
//! so a sealed value copied into another Secret does not open.
//!
//! # Storage in a Kubernetes Secret
//!
//! A sealed value for the Secret data key `<key>` is three entries of the Secret's `data`
//! (Kubernetes data keys may not contain `/`, hence suffixes instead of an `agentplane.dev/` prefix):
//!
//! | entry | holds |
//! | --- | --- |
//! | `<key>.edk` | the data key as encrypted by KMS (KMS's `CiphertextBlob`, which names the KMS key) |
//! | `<key>.nonce` | the 12-byte ChaCha20-Poly1305 nonce |
//! | `<key>.ciphertext` | ChaCha20-Poly1305 ciphertext with its 16-byte tag appended |
//!
//! One Secret can hold several sealed keys side by side. The format is version 1; the version is part
//! of the associated data, so a later format cannot be mistaken for this one.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::types::DataKeySpec;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use k8s_openapi::ByteString;

use super::{SecretError, SecretValue};

pub const EDK_SUFFIX: &str = ".edk";
pub const NONCE_SUFFIX: &str = ".nonce";
pub const CIPHERTEXT_SUFFIX: &str = ".ciphertext";
pub const NONCE_LEN: usize = 12;
/// ChaCha20-Poly1305 appends a 16-byte tag.
const TAG_LEN: usize = 16;
const DATA_KEY_LEN: usize = 32;
/// Largest value `seal` accepts: far above any API key or service-account file, far below the 1 MiB a
/// Kubernetes Secret may hold.
pub const MAX_PLAINTEXT: usize = 256 * 1024;
/// Domain separation for the associated data; the `v1` is the storage format version.
const AAD_TAG: &[u8] = b"agentplane.dev/kms-envelope/v1";
/// Longest KMS error message kept in an error (they can quote request details at length).
const MAX_MESSAGE: usize = 300;

/// A value sealed under a KMS key; see the module docs for its storage layout.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    /// The data key, encrypted by KMS.
    pub encrypted_data_key: Vec<u8>,
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte Poly1305 tag.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedSecret {
    // Nothing here is secret, but the bytes are noise in logs: show sizes only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("encrypted_data_key_len", &self.encrypted_data_key.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

impl SealedSecret {
    /// The Secret data entries (`edk`, `nonce`, `ciphertext`) that hold a sealed `key`.
    pub fn data_keys(key: &str) -> [String; 3] {
        [
            format!("{key}{EDK_SUFFIX}"),
            format!("{key}{NONCE_SUFFIX}"),
            format!("{key}{CIPHERTEXT_SUFFIX}"),
        ]
    }

    /// The Secret `data` entries for this value stored under `key`.
    pub fn to_secret_data(&self, key: &str) -> BTreeMap<String, ByteString> {
        let [edk, nonce, ciphertext] = Self::data_keys(key);
        BTreeMap::from([
            (edk, ByteString(self.encrypted_data_key.clone())),
            (nonce, ByteString(self.nonce.to_vec())),
            (ciphertext, ByteString(self.ciphertext.clone())),
        ])
    }

    /// Reads the value sealed under `key` from a Secret's `data`. `secret` names the Secret in errors.
    pub fn from_secret_data(
        data: &BTreeMap<String, ByteString>,
        secret: &str,
        key: &str,
    ) -> Result<SealedSecret, SecretError> {
        let names = Self::data_keys(key);
        let found: Vec<Option<&ByteString>> = names.iter().map(|n| data.get(n)).collect();
        if found.iter().all(Option::is_none) {
            let detail = if data.contains_key(key) {
                "; it holds a plain value under that key, not a KMS-sealed one (expected the entries "
                    .to_owned()
                    + &names.join(", ")
                    + ")"
            } else {
                format!(" (expected the entries {})", names.join(", "))
            };
            return Err(SecretError::MissingKey {
                secret: secret.to_owned(),
                key: key.to_owned(),
                detail,
            });
        }
        let missing: Vec<&str> = names
            .iter()
            .zip(&found)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        let [Some(edk), Some(nonce), Some(ciphertext)] = found[..] else {
            return Err(SecretError::MissingKey {
                secret: secret.to_owned(),
                key: key.to_owned(),
                detail: format!(
                    "; the envelope is incomplete: {} missing",
                    missing.join(", ")
                ),
            });
        };
        let malformed = |reason: String| SecretError::Malformed {
            secret: secret.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let nonce: [u8; NONCE_LEN] = nonce.0.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "the nonce is {} bytes, expected {NONCE_LEN}",
                nonce.0.len()
            ))
        })?;
        if edk.0.is_empty() {
            return Err(malformed("the encrypted data key is empty".into()));
        }
        if ciphertext.0.len() < TAG_LEN {
            return Err(malformed(format!(
                "the ciphertext is {} bytes, shorter than its {TAG_LEN}-byte tag",
                ciphertext.0.len()
            )));
        }
        Ok(SealedSecret {
            encrypted_data_key: edk.0.clone(),
            nonce,
            ciphertext: ciphertext.0.clone(),
        })
    }
}

/// Seals `plaintext` under the KMS key `key_id` (id, ARN or `alias/...`), bound to `context`.
pub async fn seal(
    kms: &aws_sdk_kms::Client,
    key_id: &str,
    plaintext: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<SealedSecret, SecretError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(SecretError::TooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT,
        });
    }
    let mut out = kms
        .generate_data_key()
        .key_id(key_id)
        .key_spec(DataKeySpec::Aes256)
        .set_encryption_context(kms_context(context))
        .send()
        .await
        .map_err(|e| kms_error("GenerateDataKey", e))?;
    let encrypted_data_key = out
        .ciphertext_blob
        .take()
        .map(|b| b.into_inner())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad_reply("GenerateDataKey", "no CiphertextBlob in the reply"))?;
    // Moved straight into a SecretValue so the plaintext data key is zeroed when it goes.
    let data_key = SecretValue::new(
        out.plaintext
            .take()
            .map(|b| b.into_inner())
            .ok_or_else(|| bad_reply("GenerateDataKey", "no Plaintext in the reply"))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| SecretError::Random(e.to_string()))?;
    let ciphertext = encrypt_with(&data_key, &nonce, plaintext, context)?;
    Ok(SealedSecret {
        encrypted_data_key,
        nonce,
        ciphertext,
    })
}

/// Opens a sealed value under the same `context` it was sealed with.
pub async fn open(
    kms: &aws_sdk_kms::Client,
    sealed: &SealedSecret,
    context: &BTreeMap<String, String>,
) -> Result<SecretValue, SecretError> {
    open_pinned(kms, sealed, context, None).await
}

/// [`open`], refusing a value sealed under any KMS key but `key_id` (KMS checks it: Decrypt with a
/// KeyId fails with IncorrectKeyException for a data key of another key), so a Secret written by
/// someone holding a different key cannot feed the worker.
pub async fn open_pinned(
    kms: &aws_sdk_kms::Client,
    sealed: &SealedSecret,
    context: &BTreeMap<String, String>,
    key_id: Option<&str>,
) -> Result<SecretValue, SecretError> {
    let mut out = kms
        .decrypt()
        .set_key_id(key_id.map(str::to_owned))
        .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(
            sealed.encrypted_data_key.clone(),
        ))
        .set_encryption_context(kms_context(context))
        .send()
        .await
        .map_err(|e| kms_error("Decrypt", e))?;
    let data_key = SecretValue::new(
        out.plaintext
            .take()
            .map(|b| b.into_inner())
            .ok_or_else(|| bad_reply("Decrypt", "no Plaintext in the reply"))?,
    );
    decrypt_with(&data_key, sealed, context)
}

/// The local half of sealing: ChaCha20-Poly1305 under `data_key` with the context as associated data.
fn encrypt_with(
    data_key: &SecretValue,
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<Vec<u8>, SecretError> {
    let aad = associated_data(context);
    cipher(data_key, "GenerateDataKey")?
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        // Only fails for messages beyond ChaCha20's 256 GiB limit, which MAX_PLAINTEXT rules out.
        .map_err(|_| bad_reply("GenerateDataKey", "encryption failed"))
}

/// The local half of opening; any change to ciphertext, nonce or context fails authentication.
fn decrypt_with(
    data_key: &SecretValue,
    sealed: &SealedSecret,
    context: &BTreeMap<String, String>,
) -> Result<SecretValue, SecretError> {
    let aad = associated_data(context);
    let plaintext = cipher(data_key, "Decrypt")?
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| SecretError::Integrity)?;
    Ok(SecretValue::new(plaintext))
}

fn cipher(data_key: &SecretValue, op: &'static str) -> Result<ChaCha20Poly1305, SecretError> {
    if data_key.len() != DATA_KEY_LEN {
        return Err(bad_reply(
            op,
            &format!(
                "the data key is {} bytes, expected {DATA_KEY_LEN}",
                data_key.len()
            ),
        ));
    }
    ChaCha20Poly1305::new_from_slice(data_key.expose())
        .map_err(|_| bad_reply(op, "the data key has the wrong length"))
}

/// The context as KMS takes it; an empty context is sent as none.
fn kms_context(context: &BTreeMap<String, String>) -> Option<HashMap<String, String>> {
    (!context.is_empty()).then(|| {
        context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
}

/// The AEAD's associated data: the format tag, then each context entry in key order as
/// length-prefixed key and value, so no two contexts encode alike.
fn associated_data(context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_TAG.len() + 64);
    aad.extend_from_slice(AAD_TAG);
    for (k, v) in context {
        for part in [k, v] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
    }
    aad
}

fn bad_reply(op: &'static str, message: &str) -> SecretError {
    SecretError::Kms {
        op,
        message: message.to_owned(),
        transient: false,
    }
}

/// KMS error codes a retry can fix.
const TRANSIENT_KMS_CODES: &[&str] = &[
    "KMSInternalException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
    "ThrottlingException",
    "LimitExceededException",
];

fn kms_error<E, R>(op: &'static str, e: SdkError<E, R>) -> SecretError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let transient = match &e {
        SdkError::ServiceError(s) => s
            .err()
            .code()
            .is_some_and(|c| TRANSIENT_KMS_CODES.contains(&c)),
        SdkError::ConstructionFailure(_) => false,
        // Timeouts, connection failures, unreadable replies.
        _ => true,
    };
    let message = match (e.code(), e.message()) {
        (Some(code), Some(m)) => format!("{code}: {m}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(&e).to_string(),
    };
    SecretError::Kms {
        op,
        message: message.chars().take(MAX_MESSAGE).collect(),
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn associated_data_is_unambiguous() {
        // Without length prefixes these two would encode alike.
        let a = associated_data(&ctx(&[("ab", "c")]));
        let b = associated_data(&ctx(&[("a", "bc")]));
        assert_ne!(a, b);
        assert_ne!(associated_data(&ctx(&[])), a);
        assert!(associated_data(&ctx(&[])).starts_with(AAD_TAG));
    }

    #[test]
    fn the_aead_binds_the_context_on_its_own() {
        // What protects a value even from someone who may call KMS Decrypt under any context.
        let key = SecretValue::new(vec![3; DATA_KEY_LEN]);
        let a = ctx(&[("agentplane.dev/secret", "a")]);
        let b = ctx(&[("agentplane.dev/secret", "b")]);
        let sealed = SealedSecret {
            encrypted_data_key: vec![1],
            nonce: [5; NONCE_LEN],
            ciphertext: encrypt_with(&key, &[5; NONCE_LEN], b"sk-1", &a).unwrap(),
        };
        assert_eq!(decrypt_with(&key, &sealed, &a).unwrap().expose(), b"sk-1");
        assert!(matches!(
            decrypt_with(&key, &sealed, &b),
            Err(SecretError::Integrity)
        ));
        assert!(matches!(
            decrypt_with(&SecretValue::new(vec![3; 16]), &sealed, &a),
            Err(SecretError::Kms { .. })
        ));
    }

    #[test]
    fn secret_data_round_trips() {
        let sealed = SealedSecret {
            encrypted_data_key: vec![1; 40],
            nonce: [7; NONCE_LEN],
            ciphertext: vec![9; 30],
        };
        let data = sealed.to_secret_data("api-key");
        assert_eq!(
            data.keys().cloned().collect::<Vec<_>>(),
            ["api-key.ciphertext", "api-key.edk", "api-key.nonce"]
        );
        assert_eq!(
            SealedSecret::from_secret_data(&data, "ns/s", "api-key").unwrap(),
            sealed
        );
    }

    #[test]
    fn incomplete_or_malformed_entries_are_refused() {
        let sealed = SealedSecret {
            encrypted_data_key: vec![1; 40],
            nonce: [7; NONCE_LEN],
            ciphertext: vec![9; 30],
        };
        let mut data = sealed.to_secret_data("k");
        data.remove("k.nonce");
        let e = SealedSecret::from_secret_data(&data, "ns/s", "k").unwrap_err();
        assert!(e.to_string().contains("k.nonce missing"), "{e}");

        let mut data = sealed.to_secret_data("k");
        data.insert("k.nonce".into(), ByteString(vec![0; 5]));
        assert!(matches!(
            SealedSecret::from_secret_data(&data, "ns/s", "k"),
            Err(SecretError::Malformed { .. })
        ));

        let mut data = sealed.to_secret_data("k");
        data.insert("k.ciphertext".into(), ByteString(vec![0; 3]));
        assert!(matches!(
            SealedSecret::from_secret_data(&data, "ns/s", "k"),
            Err(SecretError::Malformed { .. })
        ));

        let plain = BTreeMap::from([("k".to_owned(), ByteString(b"sk-plain".to_vec()))]);
        let e = SealedSecret::from_secret_data(&plain, "ns/s", "k").unwrap_err();
        assert!(matches!(e, SecretError::MissingKey { .. }));
        assert!(e.to_string().contains("plain value"), "{e}");
        assert!(!e.to_string().contains("sk-plain"));
    }
}
