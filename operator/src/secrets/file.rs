//! [`FileSecrets`]: secret values as files, `<root>/<name>/<key>`.
//!
//! This is the layout of Kubernetes Secrets mounted as volumes (mount each Secret at `<root>/<name>`;
//! every data key becomes a file), so the same source serves `agentplane dev` (a directory of plain
//! files beside the data directory) and a worker given ordinary, non-sealed Secrets. Files are read on
//! every call: they are local and small, and a rotated key takes effect at once.

use std::path::{Path, PathBuf};

use agentplane_api::policy::SecretKeyRef;
use async_trait::async_trait;

use super::{SecretError, SecretSource, SecretValue, validate_ref};

/// Largest secret file read; an API key is a few hundred bytes at most.
pub const MAX_FILE_SECRET: u64 = 64 * 1024;

/// Reads `<root>/<name>/<key>`. One trailing newline (`\n` or `\r\n`) is removed, since editors and
/// `echo` add one and no API key ends in one.
#[derive(Clone, Debug)]
pub struct FileSecrets {
    root: PathBuf,
}

impl FileSecrets {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileSecrets { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait]
impl SecretSource for FileSecrets {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretValue, SecretError> {
        // Also what keeps the path inside `root`: neither part may hold '/' or be '..'.
        validate_ref(r)?;
        let dir = self.root.join(&r.name);
        let path = dir.join(&r.key);
        let io = |source: std::io::Error| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(if tokio::fs::metadata(&dir).await.is_ok() {
                    SecretError::MissingKey {
                        secret: dir.display().to_string(),
                        key: r.key.clone(),
                        detail: String::new(),
                    }
                } else {
                    SecretError::NotFound(dir.display().to_string())
                });
            }
            Err(e) => return Err(io(e)),
        };
        if !meta.is_file() {
            return Err(SecretError::Malformed {
                secret: dir.display().to_string(),
                key: r.key.clone(),
                reason: "not a regular file".into(),
            });
        }
        if meta.len() > MAX_FILE_SECRET {
            return Err(SecretError::TooLarge {
                len: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                max: MAX_FILE_SECRET as usize,
            });
        }
        let mut bytes = SecretValue::new(tokio::fs::read(&path).await.map_err(io)?);
        let trim = if bytes.expose().ends_with(b"\r\n") {
            2
        } else if bytes.expose().ends_with(b"\n") {
            1
        } else {
            0
        };
        if trim > 0 {
            // Copy out rather than truncate in place, so the dropped original is zeroed in full.
            bytes = SecretValue::new(bytes.expose()[..bytes.len() - trim].to_vec());
        }
        Ok(bytes)
    }
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

    #[tokio::test]
    async fn reads_files_and_explains_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("openai")).unwrap();
        std::fs::write(dir.path().join("openai/api-key"), "sk-test\n").unwrap();
        std::fs::write(dir.path().join("openai/raw"), "a\r\nb").unwrap();
        let s = FileSecrets::new(dir.path());

        let v = s.get(&r("openai", "api-key")).await.unwrap();
        assert_eq!(v.expose(), b"sk-test");
        assert_eq!(
            s.get(&r("openai", "raw")).await.unwrap().expose(),
            b"a\r\nb"
        );

        let e = s.get(&r("openai", "other")).await.unwrap_err();
        assert!(matches!(e, SecretError::MissingKey { .. }), "{e}");
        let e = s.get(&r("anthropic", "api-key")).await.unwrap_err();
        assert!(matches!(e, SecretError::NotFound(_)), "{e}");
        let e = s.get(&r("openai", "..")).await.unwrap_err();
        assert!(matches!(e, SecretError::InvalidRef { .. }), "{e}");

        std::fs::write(
            dir.path().join("openai/huge"),
            vec![b'x'; MAX_FILE_SECRET as usize + 1],
        )
        .unwrap();
        let e = s.get(&r("openai", "huge")).await.unwrap_err();
        assert!(matches!(e, SecretError::TooLarge { .. }), "{e}");
    }
}
