//! Signed checkpoints: a signature over the log's origin, size, root hash and time.
//!
//! The signed body is text in the shape of a C2SP tlog checkpoint, one field per line:
//!
//! ```text
//! <origin>
//! <size, decimal>
//! <root hash, standard base64>
//! <timestamp, milliseconds since the Unix epoch>
//! ```
//!
//! Two signers implement [`CheckpointSigner`]: [`Ed25519Signer`] (a local key file, `agentplane dev`)
//! and [`KmsSigner`] (AWS KMS, key spec ECC_NIST_P256, ECDSA_SHA_256). Verification is always offline:
//! a [`TrustedKey`] is a SubjectPublicKeyInfo, identified by the SHA-256 of its canonical DER encoding,
//! so the same key read from KMS, from the log or from a PEM file has the same id.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::merkle::Hash;

/// Longest origin accepted: keeps the signed body far below KMS's 4096-byte RAW message limit.
pub const MAX_ORIGIN_LEN: usize = 256;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (33 bytes) }, followed by the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// First line of a local audit key file; lets a future format be told apart.
const KEY_FILE_HEADER: &str = "agentplane-audit-key v1";

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("cannot read key file {path}: {source}")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    KeyWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` if it is yours, or replace the key if it may have leaked"
    )]
    PermissionsTooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} is not an agentplane audit key: {reason}")]
    KeyMalformed { path: PathBuf, reason: String },
    #[error("no randomness from the operating system: {0}")]
    Randomness(String),
    #[error("KMS: {0}")]
    Kms(String),
    #[error("KMS key {key_id} cannot sign checkpoints: {reason}")]
    KmsKey { key_id: String, reason: String },
    #[error("not a usable public key: {0}")]
    PublicKey(String),
    #[error("signature is malformed: {0}")]
    SignatureMalformed(String),
    #[error("signature does not verify with key {key_id}")]
    BadSignature { key_id: String },
    #[error("origin must be 1 to {MAX_ORIGIN_LEN} printable characters without newlines")]
    BadOrigin,
}

/// Signature schemes a checkpoint can carry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// Ed25519 (RFC 8032) over the body, verified strictly.
    #[serde(rename = "ed25519")]
    Ed25519,
    /// ECDSA over P-256 with SHA-256 of the body, DER-encoded signature (what KMS returns).
    #[serde(rename = "ecdsa-p256-sha256")]
    EcdsaP256Sha256,
}

impl SignatureAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureAlgorithm::Ed25519 => "ed25519",
            SignatureAlgorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }
}

/// Checks an origin string: it becomes one line of the signed body.
pub fn check_origin(origin: &str) -> Result<(), SignerError> {
    if origin.is_empty() || origin.len() > MAX_ORIGIN_LEN || origin.chars().any(|c| c.is_control())
    {
        return Err(SignerError::BadOrigin);
    }
    Ok(())
}

/// The signed body of a checkpoint.
pub fn checkpoint_body(origin: &str, size: u64, root: &Hash, timestamp_ms: i64) -> String {
    format!("{origin}\n{size}\n{}\n{timestamp_ms}\n", B64.encode(root))
}

/// A signed tree head as stored in the log and exported by `agentplane audit checkpoint`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedCheckpoint {
    /// Position among the log's checkpoints, from 0.
    pub index: u64,
    pub origin: String,
    pub size: u64,
    #[serde(with = "super::encoding::hex_hash")]
    pub root: Hash,
    pub timestamp_ms: i64,
    /// SHA-256 (hex) of the signer's SubjectPublicKeyInfo.
    pub key_id: String,
    pub algorithm: SignatureAlgorithm,
    #[serde(with = "super::encoding::base64_bytes")]
    pub signature: Vec<u8>,
}

impl SignedCheckpoint {
    pub fn body(&self) -> String {
        checkpoint_body(&self.origin, self.size, &self.root, self.timestamp_ms)
    }

    /// Checks the signature with `key`, which must be the key the checkpoint names.
    pub fn verify(&self, key: &TrustedKey) -> Result<(), SignerError> {
        if key.key_id() != self.key_id || key.algorithm() != self.algorithm {
            return Err(SignerError::BadSignature {
                key_id: key.key_id().to_owned(),
            });
        }
        key.verify(self.body().as_bytes(), &self.signature)
    }
}

#[derive(Clone, Debug)]
enum KeyKind {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// A public key checkpoints are verified with.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    key_id: String,
    /// Canonical SubjectPublicKeyInfo DER (uncompressed point for P-256).
    spki_der: Vec<u8>,
    kind: KeyKind,
}

impl PartialEq for TrustedKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}

impl TrustedKey {
    pub fn ed25519(key: ed25519_dalek::VerifyingKey) -> Self {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(key.as_bytes());
        TrustedKey {
            key_id: key_id_for(&der),
            spki_der: der,
            kind: KeyKind::Ed25519(key),
        }
    }

    pub fn p256(key: p256::ecdsa::VerifyingKey) -> Result<Self, SignerError> {
        use p256::pkcs8::EncodePublicKey as _;
        let der = p256::PublicKey::from(&key)
            .to_public_key_der()
            .map_err(|e| SignerError::PublicKey(e.to_string()))?
            .as_bytes()
            .to_vec();
        Ok(TrustedKey {
            key_id: key_id_for(&der),
            spki_der: der,
            kind: KeyKind::P256(key),
        })
    }

    /// Parses a DER SubjectPublicKeyInfo holding an Ed25519 or a P-256 key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SignerError> {
        if let Some(raw) = der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            let bytes: [u8; 32] = raw
                .try_into()
                .map_err(|_| SignerError::PublicKey("Ed25519 key of the wrong length".into()))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|e| SignerError::PublicKey(e.to_string()))?;
            return Ok(Self::ed25519(key));
        }
        use p256::pkcs8::DecodePublicKey as _;
        let key = p256::PublicKey::from_public_key_der(der).map_err(|e| {
            SignerError::PublicKey(format!("neither an Ed25519 nor a P-256 key ({e})"))
        })?;
        Self::p256(p256::ecdsa::VerifyingKey::from(&key))
    }

    /// Parses a PEM `PUBLIC KEY` block (SubjectPublicKeyInfo).
    pub fn from_pem(text: &str) -> Result<Self, SignerError> {
        let body = text
            .split("-----BEGIN PUBLIC KEY-----")
            .nth(1)
            .and_then(|rest| rest.split("-----END PUBLIC KEY-----").next())
            .ok_or_else(|| SignerError::PublicKey("no PUBLIC KEY PEM block".into()))?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = B64
            .decode(b64)
            .map_err(|e| SignerError::PublicKey(format!("PEM body is not base64: {e}")))?;
        Self::from_spki_der(&der)
    }

    pub fn to_pem(&self) -> String {
        let b64 = B64.encode(&self.spki_der);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    pub fn algorithm(&self) -> SignatureAlgorithm {
        match self.kind {
            KeyKind::Ed25519(_) => SignatureAlgorithm::Ed25519,
            KeyKind::P256(_) => SignatureAlgorithm::EcdsaP256Sha256,
        }
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignerError> {
        let bad = || SignerError::BadSignature {
            key_id: self.key_id.clone(),
        };
        match &self.kind {
            KeyKind::Ed25519(key) => {
                let sig = ed25519_dalek::Signature::from_slice(signature)
                    .map_err(|e| SignerError::SignatureMalformed(e.to_string()))?;
                key.verify_strict(message, &sig).map_err(|_| bad())
            }
            KeyKind::P256(key) => {
                use p256::ecdsa::signature::Verifier as _;
                let sig = p256::ecdsa::Signature::from_der(signature)
                    .map_err(|e| SignerError::SignatureMalformed(e.to_string()))?;
                key.verify(message, &sig).map_err(|_| bad())
            }
        }
    }
}

/// SHA-256 (hex) of a SubjectPublicKeyInfo DER encoding.
pub fn key_id_for(spki_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der))
}

/// Something that signs checkpoint bodies. The private key need not leave it.
#[async_trait]
pub trait CheckpointSigner: Send + Sync + 'static {
    /// The public half, stored in the log and used to check every signature before it is stored.
    fn public_key(&self) -> &TrustedKey;
    /// A human description for logs (never the secret).
    fn describe(&self) -> String;
    /// Signs `message` (a checkpoint body) with the scheme of [`Self::public_key`].
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError>;
}

/// A local Ed25519 key, kept in a 0600 file (`agentplane dev`).
pub struct Ed25519Signer {
    key: ed25519_dalek::SigningKey,
    public: TrustedKey,
    source: String,
}

impl Ed25519Signer {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = TrustedKey::ed25519(key.verifying_key());
        Ed25519Signer {
            key,
            public,
            source: "in-memory Ed25519 key".into(),
        }
    }

    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, SignerError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| SignerError::Randomness(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// Loads the key at `path`, creating it (mode 0600, written and fsynced before use) if missing. A key
    /// file readable by others is refused rather than used.
    pub fn load_or_create(path: &Path) -> Result<Self, SignerError> {
        match Self::load(path)? {
            Some(s) => Ok(s),
            None => {
                let fresh = Self::generate()?;
                match create_key_file(path, &fresh.key.to_bytes()) {
                    Ok(()) => Ok(Self {
                        source: format!("Ed25519 key file {}", path.display()),
                        ..fresh
                    }),
                    // Another process created it first: use theirs, so both sign with one key.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path)?
                        .ok_or_else(|| SignerError::KeyMalformed {
                            path: path.into(),
                            reason: "vanished while being created".into(),
                        }),
                    Err(source) => Err(SignerError::KeyWrite {
                        path: path.into(),
                        source,
                    }),
                }
            }
        }
    }

    /// Loads the key at `path`, which must exist.
    pub fn load_existing(path: &Path) -> Result<Self, SignerError> {
        Self::load(path)?.ok_or_else(|| SignerError::KeyRead {
            path: path.into(),
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    fn load(path: &Path) -> Result<Option<Self>, SignerError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SignerError::KeyRead {
                    path: path.into(),
                    source,
                });
            }
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SignerError::PermissionsTooOpen {
                path: path.into(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(|source| SignerError::KeyRead {
            path: path.into(),
            source,
        })?;
        let malformed = |reason: &str| SignerError::KeyMalformed {
            path: path.into(),
            reason: reason.into(),
        };
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(malformed("missing header line"));
        }
        let seed_b64 = lines
            .next()
            .and_then(|l| l.strip_prefix("ed25519 "))
            .ok_or_else(|| malformed("missing `ed25519 <seed>` line"))?;
        let seed: [u8; 32] = B64
            .decode(seed_b64.trim())
            .map_err(|_| malformed("seed is not base64"))?
            .try_into()
            .map_err(|_| malformed("seed is not 32 bytes"))?;
        Ok(Some(Self {
            source: format!("Ed25519 key file {}", path.display()),
            ..Self::from_seed(seed)
        }))
    }
}

/// Creates `path` with mode 0600 (failing if it exists), writes the key and fsyncs file and directory.
fn create_key_file(path: &Path, seed: &[u8; 32]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let text = format!("{KEY_FILE_HEADER}\ned25519 {}\n", B64.encode(seed));
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        // Never leave a half-written key behind for the next start to trip over.
        let _ = fs::remove_file(path);
        return Err(e);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[async_trait]
impl CheckpointSigner for Ed25519Signer {
    fn public_key(&self) -> &TrustedKey {
        &self.public
    }

    fn describe(&self) -> String {
        format!("{} (key id {})", self.source, self.public.key_id())
    }

    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        use ed25519_dalek::Signer as _;
        Ok(self.key.sign(message).to_bytes().to_vec())
    }
}

/// An AWS KMS asymmetric key (KeySpec ECC_NIST_P256, KeyUsage SIGN_VERIFY) signing with ECDSA_SHA_256.
///
/// Bodies are sent with `MessageType::Raw` and KMS hashes them: they are a few hundred bytes, under the
/// 4096-byte RAW limit. `Digest` would save nothing here and moto (the test endpoint) ignores the
/// message type, signing the digest as if it were the message, so a DIGEST signature made against moto
/// would not verify offline (DESIGN.md §6 lists DIGEST signing among moto's gaps).
pub struct KmsSigner {
    client: aws_sdk_kms::Client,
    kms_key_id: String,
    public: TrustedKey,
}

impl KmsSigner {
    /// Reads the key's public half (GetPublicKey) and checks it can sign checkpoints.
    pub async fn new(
        client: aws_sdk_kms::Client,
        kms_key_id: impl Into<String>,
    ) -> Result<Self, SignerError> {
        use aws_sdk_kms::types::{KeySpec, KeyUsageType, SigningAlgorithmSpec};
        let kms_key_id = kms_key_id.into();
        let out = client
            .get_public_key()
            .key_id(&kms_key_id)
            .send()
            .await
            .map_err(|e| {
                SignerError::Kms(aws_sdk_kms::error::DisplayErrorContext(e).to_string())
            })?;
        let unusable = |reason: String| SignerError::KmsKey {
            key_id: kms_key_id.clone(),
            reason,
        };
        // moto answers only the deprecated CustomerMasterKeySpec; the parsed key below is checked to be
        // P-256 whatever the spec fields say.
        #[allow(deprecated)]
        let spec_is_p256 = match (out.key_spec(), out.customer_master_key_spec()) {
            (Some(spec), _) => spec == &KeySpec::EccNistP256,
            (None, Some(spec)) => spec == &aws_sdk_kms::types::CustomerMasterKeySpec::EccNistP256,
            (None, None) => true,
        };
        if !spec_is_p256 {
            return Err(unusable(format!(
                "key spec is {:?}, not ECC_NIST_P256",
                out.key_spec()
            )));
        }
        if out.key_usage() != Some(&KeyUsageType::SignVerify) {
            return Err(unusable(format!(
                "key usage is {:?}, not SIGN_VERIFY",
                out.key_usage()
            )));
        }
        if !out
            .signing_algorithms()
            .contains(&SigningAlgorithmSpec::EcdsaSha256)
        {
            return Err(unusable(
                "ECDSA_SHA_256 is not among its signing algorithms".into(),
            ));
        }
        let der = out
            .public_key()
            .ok_or_else(|| unusable("GetPublicKey returned no key".into()))?;
        let public = TrustedKey::from_spki_der(der.as_ref())?;
        if public.algorithm() != SignatureAlgorithm::EcdsaP256Sha256 {
            return Err(unusable("the public key is not a P-256 key".into()));
        }
        Ok(KmsSigner {
            client,
            kms_key_id,
            public,
        })
    }
}

#[async_trait]
impl CheckpointSigner for KmsSigner {
    fn public_key(&self) -> &TrustedKey {
        &self.public
    }

    fn describe(&self) -> String {
        format!(
            "KMS key {} (key id {})",
            self.kms_key_id,
            self.public.key_id()
        )
    }

    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        use aws_sdk_kms::primitives::Blob;
        use aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};
        let out = self
            .client
            .sign()
            .key_id(&self.kms_key_id)
            .message(Blob::new(message.to_vec()))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| {
                SignerError::Kms(aws_sdk_kms::error::DisplayErrorContext(e).to_string())
            })?;
        out.signature
            .map(Blob::into_inner)
            .ok_or_else(|| SignerError::Kms("Sign returned no signature".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(key: &TrustedKey, signature: Vec<u8>) -> SignedCheckpoint {
        SignedCheckpoint {
            index: 0,
            origin: "test/log".into(),
            size: 3,
            root: [7; 32],
            timestamp_ms: 1_700_000_000_000,
            key_id: key.key_id().into(),
            algorithm: key.algorithm(),
            signature,
        }
    }

    #[tokio::test]
    async fn ed25519_checkpoints_verify_and_tampering_is_caught() {
        let s = Ed25519Signer::from_seed([9; 32]);
        let body = checkpoint_body("test/log", 3, &[7; 32], 1_700_000_000_000);
        let sig = s.sign(body.as_bytes()).await.unwrap();
        let cp = checkpoint(s.public_key(), sig);
        cp.verify(s.public_key()).unwrap();
        for tamper in [
            |c: &mut SignedCheckpoint| c.size += 1,
            |c: &mut SignedCheckpoint| c.root[0] ^= 1,
            |c: &mut SignedCheckpoint| c.timestamp_ms += 1,
            |c: &mut SignedCheckpoint| c.origin.push('x'),
        ] {
            let mut bad = cp.clone();
            tamper(&mut bad);
            assert!(bad.verify(s.public_key()).is_err());
        }
        let other = Ed25519Signer::from_seed([8; 32]);
        assert!(cp.verify(other.public_key()).is_err());
    }

    #[test]
    fn public_keys_round_trip_through_pem_with_stable_ids() {
        let ed = Ed25519Signer::from_seed([1; 32]);
        let pem = ed.public_key().to_pem();
        let back = TrustedKey::from_pem(&pem).unwrap();
        assert_eq!(&back, ed.public_key());
        assert_eq!(back.key_id(), ed.public_key().key_id());
        assert_eq!(back.algorithm(), SignatureAlgorithm::Ed25519);

        let sk = p256::ecdsa::SigningKey::from_slice(&[5; 32]).unwrap();
        let p = TrustedKey::p256(*sk.verifying_key()).unwrap();
        let back = TrustedKey::from_pem(&p.to_pem()).unwrap();
        assert_eq!(back.key_id(), p.key_id());
        assert_eq!(back.algorithm(), SignatureAlgorithm::EcdsaP256Sha256);
        // A compressed encoding of the same point gets the same id (ids are over the canonical DER).
        use p256::pkcs8::EncodePublicKey as _;
        let uncompressed = p256::PublicKey::from(sk.verifying_key())
            .to_public_key_der()
            .unwrap();
        assert_eq!(
            TrustedKey::from_spki_der(uncompressed.as_bytes())
                .unwrap()
                .key_id(),
            p.key_id()
        );

        // ECDSA: DER signatures over the body verify; others do not.
        use p256::ecdsa::signature::Signer as _;
        let sig: p256::ecdsa::Signature = sk.sign(b"body");
        p.verify(b"body", sig.to_der().as_bytes()).unwrap();
        assert!(p.verify(b"other", sig.to_der().as_bytes()).is_err());
        assert!(matches!(
            p.verify(b"body", &[1, 2, 3]),
            Err(SignerError::SignatureMalformed(_))
        ));

        assert!(TrustedKey::from_pem("nothing here").is_err());
        assert!(TrustedKey::from_spki_der(&[0x30, 0x00]).is_err());
        assert!(TrustedKey::from_spki_der(&ED25519_SPKI_PREFIX).is_err());
    }

    #[test]
    fn key_files_are_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/audit.key");
        let a = Ed25519Signer::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Ed25519Signer::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Ed25519Signer::load_or_create(&path),
            Err(SignerError::PermissionsTooOpen { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(
            Ed25519Signer::load_or_create(&path),
            Err(SignerError::KeyMalformed { .. })
        ));
    }

    #[test]
    fn origins_with_newlines_are_refused() {
        assert!(check_origin("agentplane.dev/audit/default").is_ok());
        assert!(check_origin("").is_err());
        assert!(check_origin("a\nb").is_err());
        assert!(check_origin(&"x".repeat(MAX_ORIGIN_LEN + 1)).is_err());
    }
}
