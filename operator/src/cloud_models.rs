//! The worker's model clients: builtin models plus the OpenAI-compatible and Anthropic clients, with
//! API keys read from KMS-sealed Kubernetes Secrets of the worker's namespace.

use std::sync::Arc;

use agentplane::models::{ModelClient, Models};
use agentplane::secrets::kube::KubeKmsSecrets;
use anyhow::Context as _;

pub fn models(
    client: kube::Client,
    namespace: &str,
    aws: &aws_config::SdkConfig,
    kms_key_id: Option<String>,
) -> anyhow::Result<Arc<dyn ModelClient>> {
    let kms = aws_sdk_kms::Client::new(aws);
    let secrets = KubeKmsSecrets::new(client, namespace, kms);
    let secrets = match kms_key_id {
        Some(id) => secrets.with_key_id(id),
        None => secrets,
    };
    let models = Models::new(Arc::new(secrets)).context("building the model HTTP client")?;
    Ok(Arc::new(models))
}
