//! The worker's secrets and model clients: builtin models plus the OpenAI-compatible and Anthropic
//! clients, with API keys (and MCP servers' env and headers) read from KMS-sealed Kubernetes
//! Secrets of the worker's namespace.

use std::sync::Arc;

use agentplane::models::{ModelClient, Models};
use agentplane::secrets::kube::KubeKmsSecrets;
use anyhow::Context as _;

/// The KMS-sealed Secrets of `namespace`, opened with `kms_key_id` when one is pinned.
pub fn secrets(
    client: kube::Client,
    namespace: &str,
    aws: &aws_config::SdkConfig,
    kms_key_id: Option<String>,
) -> Arc<KubeKmsSecrets> {
    let kms = aws_sdk_kms::Client::new(aws);
    let secrets = KubeKmsSecrets::new(client, namespace, kms);
    Arc::new(match kms_key_id {
        Some(id) => secrets.with_key_id(id),
        None => secrets,
    })
}

pub fn models(secrets: Arc<KubeKmsSecrets>) -> anyhow::Result<Arc<dyn ModelClient>> {
    let models = Models::new(secrets).context("building the model HTTP client")?;
    Ok(Arc::new(models))
}
