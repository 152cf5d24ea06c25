//! Secrets for model endpoints and third-party calls (DESIGN.md §2, step 5: "secrets decrypted
//! through KMS"). The worker asks a [`SecretSource`] for the value a [`SecretKeyRef`] names:
//!
//! - [`KubeKmsSecrets`] (distributed runtime): Kubernetes Secrets holding KMS envelope-encrypted values
//!   ([`envelope`]), opened with KMS and cached for a short time;
//! - [`FileSecrets`] (`agentplane dev`, or plain mounted Secrets): one file per key, `<root>/<name>/<key>`.
//!
//! Values travel as [`SecretValue`], whose `Debug` and `Display` never show the bytes and whose memory is
//! zeroed when dropped. No error of this module carries a secret value.

pub mod envelope;
mod file;
pub mod kube;

use agentplane_api::policy::SecretKeyRef;
use async_trait::async_trait;
// `zeroize` comes through p256's re-export of `elliptic-curve`: it is already in the build and saves a
// direct dependency for one trait.
use p256::elliptic_curve::zeroize::Zeroize;

pub use envelope::SealedSecret;
pub use file::FileSecrets;
pub use kube::KubeKmsSecrets;

/// A secret's bytes. `Debug` and `Display` print `<redacted>`; the bytes are zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretValue(bytes)
    }

    /// The bytes, for the one place that must use them (a request header, a cipher).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as UTF-8 text (API keys are text), or `None` when it is not.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretValue {
    fn from(bytes: Vec<u8>) -> Self {
        SecretValue(bytes)
    }
}

impl From<&str> for SecretValue {
    fn from(s: &str) -> Self {
        SecretValue(s.as_bytes().to_vec())
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl std::fmt::Display for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The reference cannot name a Secret key (bad characters, `..`, too long).
    #[error("invalid secret reference {name:?}/{key:?}: {reason}")]
    InvalidRef {
        name: String,
        key: String,
        reason: String,
    },
    /// No such Secret (or secret directory).
    #[error("secret {0} not found")]
    NotFound(String),
    /// The Secret exists but holds no (complete) value for the key.
    #[error("secret {secret} has no key {key:?}{detail}")]
    MissingKey {
        secret: String,
        key: String,
        /// Extra context, e.g. which envelope entry is missing; empty or starting with "; ".
        detail: String,
    },
    /// The stored value has the wrong shape (nonce length, data key length, size limits).
    #[error("secret {secret} key {key:?} is malformed: {reason}")]
    Malformed {
        secret: String,
        key: String,
        reason: String,
    },
    /// A KMS call failed. `transient` is true for throttling, timeouts and KMS-side faults.
    #[error("KMS {op} failed: {message}")]
    Kms {
        op: &'static str,
        message: String,
        transient: bool,
    },
    /// The ciphertext did not authenticate: the ciphertext or nonce was altered, or it is being opened
    /// under another encryption context (another Secret, key or namespace) than it was sealed for.
    #[error(
        "sealed value failed authentication: the ciphertext or nonce was altered, or the encryption context does not match the one it was sealed with"
    )]
    Integrity,
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {message}")]
    Kube { message: String, transient: bool },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Context for an error met while reading one Secret key.
    #[error("secret {secret} key {key:?}: {source}")]
    Open {
        secret: String,
        key: String,
        #[source]
        source: Box<SecretError>,
    },
    /// A value too large to seal or to read as a secret.
    #[error("a secret value may hold at most {max} bytes, not {len}")]
    TooLarge { len: usize, max: usize },
    /// No randomness for a nonce.
    #[error("no randomness: {0}")]
    Random(String),
}

impl SecretError {
    /// Whether trying again later may succeed (a network fault, throttling), as opposed to a
    /// configuration or data problem that needs a person.
    pub fn is_transient(&self) -> bool {
        match self {
            SecretError::Kms { transient, .. } | SecretError::Kube { transient, .. } => *transient,
            SecretError::Open { source, .. } => source.is_transient(),
            SecretError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            SecretError::Random(_) => true,
            SecretError::InvalidRef { .. }
            | SecretError::NotFound(_)
            | SecretError::MissingKey { .. }
            | SecretError::Malformed { .. }
            | SecretError::TooLarge { .. }
            | SecretError::Integrity => false,
        }
    }
}

/// Where the runtime gets secret values.
#[async_trait]
pub trait SecretSource: Send + Sync {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretValue, SecretError>;

    /// Forgets any cached copy of `r` (called when an endpoint refuses the key, so the next task reads
    /// a rotated key at once instead of after the cache's TTL).
    fn invalidate(&self, _r: &SecretKeyRef) {}
}

/// Longest Secret name and key (a DNS subdomain; Kubernetes' limit for data keys).
const MAX_NAME: usize = 253;

/// Checks a reference names a Kubernetes Secret (`name`: DNS subdomain) and data key (`key`:
/// `[-._a-zA-Z0-9]+`). Besides matching what Kubernetes accepts, this is what keeps [`FileSecrets`] inside
/// its directory: neither part can hold `/`, and neither may be `.` or `..`.
pub fn validate_ref(r: &SecretKeyRef) -> Result<(), SecretError> {
    let bad = |reason: &str| SecretError::InvalidRef {
        name: r.name.chars().take(64).collect(),
        key: r.key.chars().take(64).collect(),
        reason: reason.to_owned(),
    };
    let name = r.name.as_str();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad("the name must be 1 to 253 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(bad(
            "the name must be a DNS subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)",
        ));
    }
    let key = r.key.as_str();
    if key.is_empty() || key.len() > MAX_NAME {
        return Err(bad("the key must be 1 to 253 characters"));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || key == "."
        || key == ".."
    {
        return Err(bad(
            "the key may hold only letters, digits, '-', '_' and '.', and may not be '.' or '..'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }

    #[test]
    fn secret_values_never_print() {
        let v = SecretValue::from("sk-very-secret");
        assert_eq!(format!("{v:?}"), "SecretValue(<redacted>)");
        assert_eq!(format!("{v}"), "<redacted>");
        assert_eq!(v.expose_str(), Some("sk-very-secret"));
    }

    #[test]
    fn references_are_checked() {
        assert!(validate_ref(&r("openai", "api-key")).is_ok());
        assert!(validate_ref(&r("my.secret-1", "API_KEY.v2")).is_ok());
        for (name, key) in [
            ("", "k"),
            ("a", ""),
            ("..", "k"),
            ("a/b", "k"),
            ("Upper", "k"),
            ("-a", "k"),
            ("a", ".."),
            ("a", "."),
            ("a", "x/y"),
            ("a", "sp ace"),
        ] {
            assert!(
                matches!(
                    validate_ref(&r(name, key)),
                    Err(SecretError::InvalidRef { .. })
                ),
                "{name:?}/{key:?} should be refused"
            );
        }
        assert!(validate_ref(&r(&"a".repeat(254), "k")).is_err());
    }

    #[test]
    fn transient_errors_are_told_apart() {
        assert!(!SecretError::Integrity.is_transient());
        assert!(!SecretError::NotFound("ns/x".into()).is_transient());
        let kms = SecretError::Kms {
            op: "Decrypt",
            message: "throttled".into(),
            transient: true,
        };
        let wrapped = SecretError::Open {
            secret: "ns/x".into(),
            key: "k".into(),
            source: Box::new(kms),
        };
        assert!(wrapped.is_transient());
    }
}
