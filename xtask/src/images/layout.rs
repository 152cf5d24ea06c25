//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`), written with
//! canonical JSON (keys sorted, no whitespace) so the same documents always hash the same: the
//! oci-spec types keep annotations and labels in HashMaps, whose order is random.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageIndex, MediaType, Sha256Digest};
use serde::Serialize;
use serde_json::Value;

use super::error::{ImageError, Result};
use super::layer::sha256_hex;

pub struct Layout {
    dir: PathBuf,
}

/// Serializes with object keys sorted at every level and no insignificant whitespace.
pub fn canonical_json(value: &impl Serialize) -> Result<Vec<u8>> {
    fn sorted(value: Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(String, Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sorted(serde_json::to_value(value)?))?)
}

pub fn sha256_digest(hex: &str) -> Result<Sha256Digest> {
    Ok(Sha256Digest::from_str(hex)?)
}

impl Layout {
    /// Starts a fresh layout at `dir` (anything there before is removed).
    pub fn create(dir: &Path) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(ImageError::io(dir))?;
        }
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(ImageError::io(&blobs))?;
        let marker = dir.join("oci-layout");
        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(ImageError::io(&marker))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Stores `bytes` as a blob and returns its descriptor.
    pub fn blob(&self, bytes: &[u8], media_type: MediaType) -> Result<Descriptor> {
        let hex = sha256_hex(bytes);
        let path = self.dir.join("blobs/sha256").join(&hex);
        std::fs::write(&path, bytes).map_err(ImageError::io(&path))?;
        Ok(Descriptor::new(
            media_type,
            bytes.len() as u64,
            sha256_digest(&hex)?,
        ))
    }

    /// Stores a JSON document (config, manifest, SBOM) as a blob in canonical form.
    pub fn json_blob(&self, value: &impl Serialize, media_type: MediaType) -> Result<Descriptor> {
        self.blob(&canonical_json(value)?, media_type)
    }

    /// Writes `index.json`; returns the sha256 of its bytes, the digest a registry gives it when
    /// it is pushed as an image index.
    pub fn finish(self, index: &ImageIndex) -> Result<String> {
        let bytes = canonical_json(index)?;
        let path = self.dir.join("index.json");
        std::fs::write(&path, &bytes).map_err(ImageError::io(&path))?;
        Ok(sha256_hex(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn canonical_json_sorts_keys_whatever_the_map_order() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..32 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..32).rev() {
            b.insert(format!("k{i}"), i);
        }
        let (a, b) = (canonical_json(&a).unwrap(), canonical_json(&b).unwrap());
        assert_eq!(a, b);
        assert!(
            String::from_utf8(a)
                .unwrap()
                .starts_with(r#"{"k0":0,"k1":1,"k10":10"#)
        );
    }

    #[test]
    fn bad_digest_is_an_error() {
        assert!(sha256_digest("not-hex").is_err());
    }
}
