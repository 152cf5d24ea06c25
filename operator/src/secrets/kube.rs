//! [`KubeKmsSecrets`]: KMS-sealed values in Kubernetes Secrets (layout in [`super::envelope`]).
//!
//! Each value is sealed under the encryption context [`encryption_context`] (namespace, Secret name,
//! data key), so it opens only where it was put. Opened values are cached for a short TTL (60 s by
//! default) so that a busy worker does not call KMS for every task; a rotated value therefore takes
//! effect within one TTL, or at once after [`SecretSource::invalidate`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agentplane_api::policy::SecretKeyRef;
use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use super::envelope::{self, SealedSecret};
use super::{SecretError, SecretSource, SecretValue, validate_ref};

pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Label [`KubeKmsSecrets::put`] sets on the Secrets it writes.
pub const FORMAT_LABEL: &str = "agentplane.dev/secret-format";
pub const FORMAT_LABEL_VALUE: &str = "kms-envelope-v1";
/// Encryption context keys.
pub const CONTEXT_NAMESPACE: &str = "agentplane.dev/namespace";
pub const CONTEXT_SECRET: &str = "agentplane.dev/secret";
pub const CONTEXT_KEY: &str = "agentplane.dev/key";
/// Cached values at most; far more than the tiers and third-party credentials one namespace uses.
const MAX_CACHED: usize = 256;

/// The encryption context a value stored at `namespace`/`r.name`/`r.key` is sealed under.
pub fn encryption_context(namespace: &str, r: &SecretKeyRef) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CONTEXT_NAMESPACE.to_owned(), namespace.to_owned()),
        (CONTEXT_SECRET.to_owned(), r.name.clone()),
        (CONTEXT_KEY.to_owned(), r.key.clone()),
    ])
}

/// Reads KMS-sealed values from the Secrets of one namespace.
pub struct KubeKmsSecrets {
    secrets: Api<Secret>,
    namespace: String,
    kms: aws_sdk_kms::Client,
    ttl: Duration,
    /// When set, only values sealed under this KMS key open.
    key_id: Option<String>,
    cache: Mutex<HashMap<(String, String), (Instant, SecretValue)>>,
}

impl std::fmt::Debug for KubeKmsSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeKmsSecrets")
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl KubeKmsSecrets {
    pub fn new(
        client: kube::Client,
        namespace: impl Into<String>,
        kms: aws_sdk_kms::Client,
    ) -> Self {
        let namespace = namespace.into();
        KubeKmsSecrets {
            secrets: Api::namespaced(client, &namespace),
            namespace,
            kms,
            ttl: DEFAULT_TTL,
            key_id: None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Opens only values sealed under `key_id` (the chart's `kms.keyArn`).
    pub fn with_key_id(mut self, key_id: impl Into<String>) -> Self {
        self.key_id = Some(key_id.into());
        self
    }

    /// How long an opened value is reused; `Duration::ZERO` disables the cache.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Seals `plaintext` under the KMS key `key_id` and stores it in the Secret `r.name` under `r.key`:
    /// the three envelope entries are merged into the Secret (created when missing); its other entries
    /// are left alone.
    pub async fn put(
        &self,
        key_id: &str,
        r: &SecretKeyRef,
        plaintext: &[u8],
    ) -> Result<(), SecretError> {
        validate_ref(r)?;
        let sealed = envelope::seal(
            &self.kms,
            key_id,
            plaintext,
            &encryption_context(&self.namespace, r),
        )
        .await?;
        let labels = BTreeMap::from([(FORMAT_LABEL.to_owned(), FORMAT_LABEL_VALUE.to_owned())]);
        let data = sealed.to_secret_data(&r.key);
        // A merge patch touches only this key's entries. (Server-side apply would not do: re-applying
        // under one field manager removes the entries of keys put earlier.)
        let patch = serde_json::json!({"metadata": {"labels": labels}, "data": data});
        for _ in 0..2 {
            match self
                .secrets
                .patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.invalidate(r);
                    return Ok(());
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(kube_error(e)),
            }
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(r.name.clone()),
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                },
                data: Some(data.clone()),
                ..Secret::default()
            };
            match self.secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    self.invalidate(r);
                    return Ok(());
                }
                // Created by someone else meanwhile: patch it on the next round.
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return Err(kube_error(e)),
            }
        }
        Err(SecretError::Kube {
            message: format!(
                "secret {}/{} kept appearing and disappearing while being written",
                self.namespace, r.name
            ),
            transient: true,
        })
    }

    fn cached(&self, r: &SecretKeyRef) -> Option<SecretValue> {
        if self.ttl.is_zero() {
            return None;
        }
        let cache = self.cache.lock().ok()?;
        let (at, value) = cache.get(&(r.name.clone(), r.key.clone()))?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    fn remember(&self, r: &SecretKeyRef, value: &SecretValue) {
        if self.ttl.is_zero() {
            return;
        }
        // A poisoned lock only means another thread panicked mid-insert: skip caching.
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= MAX_CACHED {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(
            (r.name.clone(), r.key.clone()),
            (Instant::now(), value.clone()),
        );
    }
}

#[async_trait]
impl SecretSource for KubeKmsSecrets {
    async fn get(&self, r: &SecretKeyRef) -> Result<SecretValue, SecretError> {
        validate_ref(r)?;
        if let Some(v) = self.cached(r) {
            return Ok(v);
        }
        let label = format!("{}/{}", self.namespace, r.name);
        let secret = self
            .secrets
            .get_opt(&r.name)
            .await
            .map_err(kube_error)?
            .ok_or_else(|| SecretError::NotFound(label.clone()))?;
        let data = secret.data.unwrap_or_default();
        let sealed = SealedSecret::from_secret_data(&data, &label, &r.key)?;
        let context = encryption_context(&self.namespace, r);
        let value = envelope::open_pinned(&self.kms, &sealed, &context, self.key_id.as_deref())
            .await
            .map_err(|e| SecretError::Open {
                secret: label,
                key: r.key.clone(),
                source: Box::new(e),
            })?;
        self.remember(r, &value);
        Ok(value)
    }

    fn invalidate(&self, r: &SecretKeyRef) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&(r.name.clone(), r.key.clone()));
        }
    }
}

fn kube_error(e: kube::Error) -> SecretError {
    let transient = match &e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        // Transport failures: the API server may be back in a moment.
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    };
    let message = match &e {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    };
    SecretError::Kube { message, transient }
}
