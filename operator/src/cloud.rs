//! What the distributed subcommands (`operator`, `worker`, `gateway`) share: connecting to the
//! Kubernetes API and AWS, the cluster-wide model tier ladder, and the plain-HTTP metrics/health
//! listener every component serves on its `metrics` port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentplane_api::policy::ModelTier;
use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error(
        "no Kubernetes configuration (in-cluster service account, KUBECONFIG or ~/.kube/config): {0}"
    )]
    KubeConfig(String),
    #[error("model tiers file {path}: {reason}")]
    Tiers { path: PathBuf, reason: String },
    #[error("metrics listener on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the process-wide rustls provider (kube's client needs one; this build links two).
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A Kubernetes client: from `kubeconfig` when given, else kube's inference (in-cluster service
/// account, then `KUBECONFIG`, then `~/.kube/config`).
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, CloudError> {
    install_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|e| CloudError::Kubeconfig {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| CloudError::Kubeconfig {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| CloudError::KubeConfig(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| CloudError::KubeConfig(e.to_string()))
}

/// The AWS SDK configuration: the default credential chain and region, with an optional endpoint
/// override (moto, LocalStack, another cloud's SQS-compatible service). `AWS_ENDPOINT_URL` in the
/// environment is honoured by the SDK itself.
pub async fn aws_config(region: Option<String>, endpoint: Option<String>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r));
    }
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}

/// `tiers.yaml` of the chart's `agentplane-models` ConfigMap.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TiersFile {
    #[serde(default)]
    pub tiers: Vec<ModelTier>,
}

/// Reads the cluster's model tier ladder. It applies to namespaces whose AgentPolicy lists no
/// `models` of its own.
pub fn read_tiers(path: &Path) -> Result<Vec<ModelTier>, CloudError> {
    let err = |reason: String| CloudError::Tiers {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: TiersFile = serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut seen = std::collections::BTreeSet::new();
    for t in &file.tiers {
        if !seen.insert(t.name.as_str()) {
            return Err(err(format!("tier name {:?} appears twice", t.name)));
        }
    }
    Ok(file.tiers)
}

/// Serves `GET /metrics` and `GET /healthz` on plain HTTP until `shutdown`. `healthy` decides the
/// health answer (e.g. "the store's watch is running").
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), CloudError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CloudError::Metrics { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| CloudError::Metrics { addr, source })?;
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], m.render()) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = healthy();
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, "ok")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
                    }
                }
            }),
        );
    let handle = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiers.yaml");
        std::fs::write(
            &p,
            "tiers:\n  - name: dev\n    endpointKind: builtin\n    endpoint: builtin:echo\n",
        )
        .unwrap();
        let tiers = read_tiers(&p).unwrap();
        assert_eq!(tiers.len(), 1);
        assert_eq!(tiers[0].endpoint, "builtin:echo");

        std::fs::write(
            &p,
            "tiers:\n  - {name: a, endpointKind: builtin, endpoint: builtin:echo}\n  - {name: a, endpointKind: builtin, endpoint: builtin:upper}\n",
        )
        .unwrap();
        assert!(
            read_tiers(&p)
                .unwrap_err()
                .to_string()
                .contains("appears twice")
        );
        std::fs::write(
            &p,
            "tiers: [{name: a, endpointKind: telepathy, endpoint: x}]",
        )
        .unwrap();
        let e = read_tiers(&p).unwrap_err().to_string();
        assert!(e.contains("tiers.yaml"), "{e}");
        assert!(read_tiers(&dir.path().join("missing.yaml")).is_err());
    }
}
