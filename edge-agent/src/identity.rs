//! Device identity: the Ed25519 key that signs every intent and every read.
//!
//! Keys come from a [`KeySource`] so a TPM or an OS keystore can replace the file store without touching
//! the rest of the agent: everything else only sees a [`DeviceSigner`], which can sign but need not expose
//! the secret. The file store keeps the 32-byte seed in a 0600 file, written atomically (temp file, fsync,
//! rename, fsync of the directory) so a power cut never leaves a half-written key behind.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// First line of a key file; lets a future format be told apart.
const KEY_FILE_HEADER: &str = "agentplane-edge-key v1";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` if it is yours, or delete it if it may have leaked"
    )]
    PermissionsTooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} is not an agentplane edge key: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("no randomness from the operating system: {0}")]
    Randomness(String),
    #[error("no key rotation is staged")]
    NothingStaged,
}

/// Something that signs with the device key. The secret need not leave it.
pub trait DeviceSigner: Send + Sync {
    /// The id the gateway knows this key by (`EdgeDevice.spec.publicKeys[].id`).
    fn key_id(&self) -> &str;
    fn public_key(&self) -> VerifyingKey;
    fn sign(&self, message: &[u8]) -> Result<Signature, IdentityError>;
}

/// Where device keys live. Rotation is two-phase: `stage_next` creates the new key beside the current one,
/// and only `commit_next` (after the gateway has registered it) makes it current, keeping the old one.
pub trait KeySource: Send + Sync {
    /// A human description for logs and errors (never the secret).
    fn describe(&self) -> String;
    /// The current key, created on first use.
    fn load_or_create(&self) -> Result<Arc<dyn DeviceSigner>, IdentityError>;
    /// The staged next key, created if none is staged yet (re-running a failed rotation reuses it).
    fn stage_next(&self) -> Result<Arc<dyn DeviceSigner>, IdentityError>;
    /// Makes the staged key current; the previous key is kept as the "previous" key.
    fn commit_next(&self) -> Result<Arc<dyn DeviceSigner>, IdentityError>;
    /// The key that was current before the last rotation, if any.
    fn previous(&self) -> Result<Option<Arc<dyn DeviceSigner>>, IdentityError>;
}

/// An in-memory Ed25519 key.
pub struct SoftKey {
    key: SigningKey,
    id: String,
}

impl SoftKey {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let id = key_id_for(&key.verifying_key());
        SoftKey { key, id }
    }

    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Randomness(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }
}

impl DeviceSigner for SoftKey {
    fn key_id(&self) -> &str {
        &self.id
    }
    fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }
    fn sign(&self, message: &[u8]) -> Result<Signature, IdentityError> {
        Ok(self.key.sign(message))
    }
}

/// A stable key id derived from the public key, so the same key always has the same id and two keys of
/// one device never collide in practice.
pub fn key_id_for(key: &VerifyingKey) -> String {
    let hex: String = key.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ed25519-{hex}")
}

/// Keys in files: `<path>` (current), `<path>.next` (staged by a rotation), `<path>.prev` (before the last
/// rotation).
pub struct FileKeySource {
    path: PathBuf,
}

impl FileKeySource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileKeySource { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        self.path.with_file_name(name)
    }

    fn load(path: &Path) -> Result<Option<SoftKey>, IdentityError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IdentityError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::PermissionsTooOpen {
                path: path.into(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: path.into(),
            source,
        })?;
        parse_key_file(&text)
            .map(Some)
            .map_err(|reason| IdentityError::Malformed {
                path: path.into(),
                reason,
            })
    }

    fn store(path: &Path, key: &SoftKey, replace: bool) -> Result<(), IdentityError> {
        let text = format!(
            "{KEY_FILE_HEADER}\ned25519 {}\n",
            B64.encode(key.key.to_bytes())
        );
        let written = if replace {
            write_private_file(path, text.as_bytes())
        } else {
            create_private_file(path, text.as_bytes())
        };
        written.map_err(|source| IdentityError::Write {
            path: path.into(),
            source,
        })
    }

    /// Creates a key at `path` unless one appears there first (another process starting at the same
    /// moment): then that one is used, so two processes never sign with different keys.
    fn create_or_load(path: &Path) -> Result<SoftKey, IdentityError> {
        let key = SoftKey::generate()?;
        match Self::store(path, &key, false) {
            Ok(()) => Ok(key),
            Err(IdentityError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Self::load(path)?.ok_or_else(|| IdentityError::Malformed {
                    path: path.into(),
                    reason: "vanished while being created".into(),
                })
            }
            Err(e) => Err(e),
        }
    }
}

fn parse_key_file(text: &str) -> Result<SoftKey, String> {
    let mut lines = text.lines();
    if lines.next() != Some(KEY_FILE_HEADER) {
        return Err(format!("first line is not {KEY_FILE_HEADER:?}"));
    }
    let line = lines.next().ok_or("no key line")?;
    let encoded = line
        .strip_prefix("ed25519 ")
        .ok_or("key line does not start with \"ed25519 \"")?;
    let bytes = B64
        .decode(encoded.trim())
        .map_err(|e| format!("key is not base64: {e}"))?;
    let seed: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("key is {} bytes, expected 32", bytes.len()))?;
    Ok(SoftKey::from_seed(seed))
}

/// Writes `bytes` to `path` with mode 0600 so that readers see either the old file or the whole new one.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = write_temp(path, bytes)?;
    let renamed = fs::rename(&tmp, path);
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    sync_parent(path)
}

/// Like `write_private_file`, but fails with `AlreadyExists` instead of replacing an existing file.
pub fn create_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = write_temp(path, bytes)?;
    // A hard link refuses to replace, which makes "create if absent" atomic between processes.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked?;
    sync_parent(path)
}

fn write_temp(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    // Unique per writer (process and thread) so concurrent writers never clobber each other's temp file.
    let nonce = getrandom::u64().map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}-{nonce:016x}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A new directory entry is only durable once the directory is.
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Creates a directory (and parents) readable only by its owner when it does not exist yet.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl KeySource for FileKeySource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn load_or_create(&self) -> Result<Arc<dyn DeviceSigner>, IdentityError> {
        if let Some(key) = Self::load(&self.path)? {
            return Ok(Arc::new(key));
        }
        let key = Self::create_or_load(&self.path)?;
        tracing::info!(key_id = key.key_id(), path = %self.path.display(), "device key ready");
        Ok(Arc::new(key))
    }

    fn stage_next(&self) -> Result<Arc<dyn DeviceSigner>, IdentityError> {
        let next = self.sibling(".next");
        if let Some(key) = Self::load(&next)? {
            return Ok(Arc::new(key));
        }
        Ok(Arc::new(Self::create_or_load(&next)?))
    }

    fn commit_next(&self) -> Result<Arc<dyn DeviceSigner>, IdentityError> {
        let next_path = self.sibling(".next");
        let next = Self::load(&next_path)?.ok_or(IdentityError::NothingStaged)?;
        if let Some(current) = Self::load(&self.path)? {
            Self::store(&self.sibling(".prev"), &current, true)?;
        }
        // Writing the current key before removing `.next` means a crash in between leaves both files
        // holding the new key, which a re-run commits again harmlessly.
        Self::store(&self.path, &next, true)?;
        fs::remove_file(&next_path).map_err(|source| IdentityError::Write {
            path: next_path.clone(),
            source,
        })?;
        Ok(Arc::new(next))
    }

    fn previous(&self) -> Result<Option<Arc<dyn DeviceSigner>>, IdentityError> {
        Ok(Self::load(&self.sibling(".prev"))?.map(|k| Arc::new(k) as Arc<dyn DeviceSigner>))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_with_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/device.key");
        let src = FileKeySource::new(&path);
        let a = src.load_or_create().unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = src.load_or_create().unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.key_id(), b.key_id());
        assert!(a.key_id().starts_with("ed25519-"));
    }

    #[test]
    fn refuses_a_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let src = FileKeySource::new(&path);
        src.load_or_create().unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = src.load_or_create().err().unwrap();
        assert!(
            matches!(err, IdentityError::PermissionsTooOpen { .. }),
            "{err}"
        );
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        for junk in [
            "",
            "hello",
            "agentplane-edge-key v1\ned25519 !!!\n",
            "agentplane-edge-key v1\ned25519 AAAA\n",
        ] {
            write_private_file(&path, junk.as_bytes()).unwrap();
            let err = FileKeySource::new(&path).load_or_create().err().unwrap();
            assert!(
                matches!(err, IdentityError::Malformed { .. }),
                "{junk:?}: {err}"
            );
        }
    }

    #[test]
    fn rotation_stages_then_commits_keeping_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let src = FileKeySource::new(dir.path().join("device.key"));
        let old = src.load_or_create().unwrap();
        let staged = src.stage_next().unwrap();
        assert_ne!(old.key_id(), staged.key_id());
        // Staging again (a retried rotation) reuses the same key.
        assert_eq!(src.stage_next().unwrap().key_id(), staged.key_id());
        // Until committed, the current key is unchanged.
        assert_eq!(src.load_or_create().unwrap().key_id(), old.key_id());
        let new = src.commit_next().unwrap();
        assert_eq!(new.key_id(), staged.key_id());
        assert_eq!(src.load_or_create().unwrap().key_id(), staged.key_id());
        assert_eq!(src.previous().unwrap().unwrap().key_id(), old.key_id());
        assert!(matches!(
            src.commit_next(),
            Err(IdentityError::NothingStaged)
        ));
    }

    #[test]
    fn concurrent_first_runs_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    FileKeySource::new(path)
                        .load_or_create()
                        .unwrap()
                        .key_id()
                        .to_owned()
                })
            })
            .collect();
        let ids: std::collections::HashSet<String> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
        let on_disk = FileKeySource::new(&path).load_or_create().unwrap();
        assert!(ids.contains(on_disk.key_id()));
    }

    #[test]
    fn signatures_verify() {
        let k = SoftKey::generate().unwrap();
        let sig = k.sign(b"m").unwrap();
        k.public_key().verify_strict(b"m", &sig).unwrap();
    }
}
