//! The agentplane provider definition: configuration schema, settings, lazily built clients.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::framework::{
    AttrPath, Attribute, Block, DataSource, Diagnostics, NestedBlock, Nesting, Provider, Resource,
    Schema, Validator, Value,
};
use crate::resources;
use crate::timeouts::{self, Timeouts};

/// Endpoint overrides (emulators such as moto/LocalStack, or S3/SQS-compatible services).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Endpoints {
    pub sqs: Option<String>,
    pub kms: Option<String>,
    pub eks: Option<String>,
}

/// Static credentials; `Debug` is redacted because these are secrets.
#[derive(Clone, PartialEq)]
pub struct StaticKeys {
    pub access_key: String,
    pub secret_key: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeys")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AwsSettings {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub keys: Option<StaticKeys>,
    pub endpoints: Endpoints,
    pub max_retries: u32,
    /// Connect/read/operation timeouts of every AWS call.
    pub timeouts: Timeouts,
}

/// Kubernetes access, stored for the cluster-side resources.
#[derive(Clone, Default, PartialEq)]
pub struct KubeSettings {
    pub host: Option<String>,
    pub token: Option<String>,
    pub cluster_ca_certificate: Option<String>,
    pub config_path: Option<String>,
    pub config_context: Option<String>,
    /// Connect/read/write timeouts of the client and the bound on each call.
    pub timeouts: Timeouts,
}

impl std::fmt::Debug for KubeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSettings")
            .field("host", &self.host)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("config_path", &self.config_path)
            .field("config_context", &self.config_context)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// Configured provider state shared by all resources.
pub struct ProviderData {
    pub aws: AwsSettings,
    pub kube: KubeSettings,
    sdk: OnceCell<aws_config::SdkConfig>,
    sqs: OnceCell<aws_sdk_sqs::Client>,
    kms: OnceCell<aws_sdk_kms::Client>,
    eks: OnceCell<aws_sdk_eks::Client>,
}

/// Default retry budget: throttling and transient errors are retried with exponential backoff
/// and jitter by the SDK's standard retry mode.
pub const DEFAULT_MAX_RETRIES: u32 = 8;

impl ProviderData {
    pub fn new(aws: AwsSettings, kube: KubeSettings) -> Self {
        ProviderData {
            aws,
            kube,
            sdk: OnceCell::new(),
            sqs: OnceCell::new(),
            kms: OnceCell::new(),
            eks: OnceCell::new(),
        }
    }

    /// Loads the shared AWS configuration on first use only: resolving the credential chain
    /// can read files and query metadata endpoints, which a plan without AWS resources must
    /// not pay for.
    async fn sdk(&self) -> &aws_config::SdkConfig {
        self.sdk
            .get_or_init(|| async {
                let retry = aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(self.aws.max_retries + 1)
                    .with_initial_backoff(std::time::Duration::from_millis(200));
                // The SDK's own timeouts: a silent endpoint fails the call instead of hanging it.
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .retry_config(retry)
                    .timeout_config(self.aws.timeouts.aws());
                if let Some(r) = &self.aws.region {
                    loader = loader.region(aws_config::Region::new(r.clone()));
                }
                if let Some(p) = &self.aws.profile {
                    loader = loader.profile_name(p);
                }
                if let Some(k) = &self.aws.keys {
                    loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                        k.access_key.clone(),
                        k.secret_key.clone(),
                        k.token.clone(),
                        None,
                        "agentplane-provider-config",
                    ));
                }
                loader.load().await
            })
            .await
    }

    pub async fn sqs(&self) -> &aws_sdk_sqs::Client {
        self.sqs
            .get_or_init(|| async {
                let mut b = aws_sdk_sqs::config::Builder::from(self.sdk().await);
                if let Some(e) = &self.aws.endpoints.sqs {
                    b = b.endpoint_url(e);
                }
                aws_sdk_sqs::Client::from_conf(b.build())
            })
            .await
    }

    pub async fn kms(&self) -> &aws_sdk_kms::Client {
        self.kms
            .get_or_init(|| async {
                let mut b = aws_sdk_kms::config::Builder::from(self.sdk().await);
                if let Some(e) = &self.aws.endpoints.kms {
                    b = b.endpoint_url(e);
                }
                aws_sdk_kms::Client::from_conf(b.build())
            })
            .await
    }

    pub async fn eks(&self) -> &aws_sdk_eks::Client {
        self.eks
            .get_or_init(|| async {
                let mut b = aws_sdk_eks::config::Builder::from(self.sdk().await);
                if let Some(e) = &self.aws.endpoints.eks {
                    b = b.endpoint_url(e);
                }
                aws_sdk_eks::Client::from_conf(b.build())
            })
            .await
    }
}

/// The agentplane provider.
pub struct AgentplaneProvider;

fn one_block(name: &'static str, block: Block) -> NestedBlock {
    NestedBlock {
        type_name: name,
        block,
        nesting: Nesting::List,
        min_items: 0,
        max_items: 1,
    }
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// First element of a `max_items = 1` block list, or null.
fn first(v: &Value) -> Value {
    match v {
        Value::List(items) => items.first().cloned().unwrap_or_default(),
        _ => Value::Null,
    }
}

/// Reads a wholly known provider configuration into settings; a bad timeout is an error on
/// its attribute.
pub fn settings(config: &Value) -> Result<(AwsSettings, KubeSettings), Diagnostics> {
    let timeouts = timeouts::from_config(config)?;
    let ep = first(config.get("endpoints"));
    let keys = match (
        opt_str(config.get("access_key")),
        opt_str(config.get("secret_key")),
    ) {
        (Some(a), Some(s)) => Some(StaticKeys {
            access_key: a,
            secret_key: s,
            token: opt_str(config.get("token")),
        }),
        _ => None,
    };
    let aws = AwsSettings {
        region: opt_str(config.get("region")),
        profile: opt_str(config.get("profile")),
        keys,
        endpoints: Endpoints {
            sqs: opt_str(ep.get("sqs")),
            kms: opt_str(ep.get("kms")),
            eks: opt_str(ep.get("eks")),
        },
        max_retries: config
            .get("max_retries")
            .as_i64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(DEFAULT_MAX_RETRIES),
        timeouts,
    };
    let k = first(config.get("kubernetes"));
    let kube = KubeSettings {
        host: opt_str(k.get("host")),
        token: opt_str(k.get("token")),
        cluster_ca_certificate: opt_str(k.get("cluster_ca_certificate")),
        config_path: opt_str(k.get("config_path")),
        config_context: opt_str(k.get("config_context")),
        timeouts,
    };
    Ok((aws, kube))
}

#[async_trait]
impl Provider for AgentplaneProvider {
    type Data = ProviderData;

    fn schema(&self) -> Schema {
        let endpoints = Block::new(
            "Endpoint overrides, e.g. an emulator such as moto on `http://127.0.0.1:5000`.",
        )
        .attr(
            Attribute::string("sqs")
                .optional()
                .describe("SQS endpoint URL."),
        )
        .attr(
            Attribute::string("kms")
                .optional()
                .describe("KMS endpoint URL."),
        )
        .attr(
            Attribute::string("eks")
                .optional()
                .describe("EKS endpoint URL."),
        );
        let [connect_timeout, read_timeout, operation_timeout] = timeouts::attributes();
        let kube = Block::new("Kubernetes access for the cluster-side resources. Either `host` (+ `token`, `cluster_ca_certificate`) or `config_path` (+ `config_context`).")
            .attr(Attribute::string("host").optional().describe("API server URL."))
            .attr(Attribute::string("token").optional().sensitive().describe("Bearer token."))
            .attr(Attribute::string("cluster_ca_certificate").optional().describe("PEM CA bundle of the API server."))
            .attr(Attribute::string("config_path").optional().describe("Path to a kubeconfig file."))
            .attr(Attribute::string("config_context").optional().describe("Context to use from the kubeconfig."));
        Schema {
            version: 0,
            block: Block::new("The agentplane provider provisions the cloud side of agentplane: KMS keys, SQS queues, the EKS cluster and GPU node pool, and, through the `kubernetes` settings, the runtime in the cluster, its KEDA scaler, edge devices and policies.")
                .attr(Attribute::string("region").optional().describe("AWS region. Defaults to the standard chain (`AWS_REGION`, profile)."))
                .attr(Attribute::string("profile").optional().describe("Shared config/credentials profile to use."))
                .attr(Attribute::string("access_key").optional().sensitive().describe("Static access key id; requires `secret_key`."))
                .attr(Attribute::string("secret_key").optional().sensitive().describe("Static secret access key; requires `access_key`."))
                .attr(Attribute::string("token").optional().sensitive().describe("Session token for temporary static credentials."))
                .attr(
                    Attribute::number("max_retries")
                        .optional()
                        .validate(Validator::IntRange(0, 25))
                        .describe("Retries for throttled or transient AWS errors (exponential backoff). Default 8."),
                )
                .attr(connect_timeout)
                .attr(read_timeout)
                .attr(operation_timeout)
                .block(one_block("endpoints", endpoints))
                .block(one_block("kubernetes", kube)),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        if let Err(d) = timeouts::from_config(config) {
            diags.extend(d);
        }
        let ak = config.get("access_key");
        let sk = config.get("secret_key");
        if ak.is_null() != sk.is_null() && !ak.is_unknown() && !sk.is_unknown() {
            let missing = if ak.is_null() {
                "access_key"
            } else {
                "secret_key"
            };
            diags.attr_error(
                AttrPath::attr(missing),
                "Incomplete static credentials",
                "`access_key` and `secret_key` must be set together.",
            );
        }
        if !ak.is_null() && !config.get("profile").is_null() {
            diags.attr_error(
                AttrPath::attr("profile"),
                "Conflicting credentials",
                "Set either `profile` or static keys (`access_key`/`secret_key`), not both.",
            );
        }
        for (i, k) in match config.get("kubernetes") {
            Value::List(v) => v.clone(),
            _ => vec![],
        }
        .iter()
        .enumerate()
        {
            if !k.get("host").is_null() && !k.get("config_path").is_null() {
                diags.attr_error(
                    AttrPath::attr("kubernetes")
                        .index(i as i64)
                        .join("config_path"),
                    "Conflicting Kubernetes settings",
                    "Set either `host` or `config_path`, not both.",
                );
            }
        }
        for (i, e) in match config.get("endpoints") {
            Value::List(v) => v.clone(),
            _ => vec![],
        }
        .iter()
        .enumerate()
        {
            for svc in ["sqs", "kms", "eks"] {
                if let Some(url) = e.get(svc).as_str()
                    && !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    diags.attr_error(
                        AttrPath::attr("endpoints").index(i as i64).join(svc),
                        "Invalid endpoint URL",
                        format!("{url:?} must start with http:// or https://."),
                    );
                }
            }
        }
    }

    async fn configure(&self, config: &Value) -> Result<ProviderData, Diagnostics> {
        let (aws, kube) = settings(config)?;
        tracing::debug!(region = ?aws.region, endpoints = ?aws.endpoints, timeouts = ?aws.timeouts, "provider configured");
        Ok(ProviderData::new(aws, kube))
    }

    fn resources(&self) -> Vec<Arc<dyn Resource<ProviderData>>> {
        vec![
            Arc::new(resources::kms_key::KmsKey),
            Arc::new(resources::queue::Queue),
            Arc::new(resources::cluster::Cluster),
            Arc::new(resources::gpu_node_pool::GpuNodePool),
            Arc::new(resources::platform::Platform),
            Arc::new(resources::keda_scaler::KedaScaler),
            Arc::new(resources::edge_device::EdgeDevice),
            Arc::new(resources::agent_policy::AgentPolicy),
        ]
    }

    fn data_sources(&self) -> Vec<Arc<dyn DataSource<ProviderData>>> {
        vec![Arc::new(resources::queue_data::QueueData)]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cfg(pairs: &[(&str, Value)]) -> Value {
        let Value::Object(mut m) = crate::framework::codec::from_json(
            &serde_json::json!({}),
            &AgentplaneProvider.schema().block.ty(),
            &AttrPath::root(),
            0,
        )
        .unwrap() else {
            panic!()
        };
        for (k, v) in pairs {
            m.insert(k.to_string(), v.clone());
        }
        Value::Object(m)
    }

    #[test]
    fn settings_read_blocks_and_keys() {
        let ep = Value::Object(BTreeMap::from([
            ("sqs".into(), Value::string("http://127.0.0.1:5000")),
            ("kms".into(), Value::Null),
            ("eks".into(), Value::Null),
        ]));
        let c = cfg(&[
            ("region", Value::string("us-east-1")),
            ("access_key", Value::string("AK")),
            ("secret_key", Value::string("SK")),
            ("endpoints", Value::List(vec![ep])),
        ]);
        let (aws, kube) = settings(&c).unwrap();
        assert_eq!(aws.timeouts, Timeouts::default());
        assert_eq!(kube.timeouts, Timeouts::default());
        assert_eq!(aws.region.as_deref(), Some("us-east-1"));
        assert_eq!(aws.endpoints.sqs.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(aws.max_retries, DEFAULT_MAX_RETRIES);
        let k = aws.keys.unwrap();
        assert!(
            !format!("{k:?}").contains("SK"),
            "secret must not appear in Debug output"
        );
    }

    #[test]
    fn half_static_keys_is_an_attribute_error() {
        let mut d = Diagnostics::new();
        AgentplaneProvider.validate(&cfg(&[("access_key", Value::string("AK"))]), &mut d);
        assert_eq!(d.0[0].path, Some(AttrPath::attr("secret_key")));
    }

    #[test]
    fn timeouts_reach_both_clients() {
        let c = cfg(&[
            ("connect_timeout", Value::string("2s")),
            ("read_timeout", Value::string("1m30s")),
            ("operation_timeout", Value::string("5m")),
        ]);
        let want = Timeouts {
            connect: std::time::Duration::from_secs(2),
            read: std::time::Duration::from_secs(90),
            operation: std::time::Duration::from_secs(300),
        };
        let (aws, kube) = settings(&c).unwrap();
        assert_eq!((aws.timeouts, kube.timeouts), (want, want));
    }

    #[test]
    fn bad_zero_and_negative_timeouts_are_errors_on_their_attribute() {
        let c = cfg(&[
            ("connect_timeout", Value::string("soon")),
            ("read_timeout", Value::string("0s")),
            ("operation_timeout", Value::string("-5s")),
        ]);
        let mut d = Diagnostics::new();
        AgentplaneProvider.validate(&c, &mut d);
        let attrs = ["connect_timeout", "read_timeout", "operation_timeout"];
        assert_eq!(d.0.len(), attrs.len(), "{d:?}");
        for (diag, attr) in d.0.iter().zip(attrs) {
            assert_eq!(diag.path, Some(AttrPath::attr(attr)), "{diag:?}");
        }
        assert!(d.0[0].detail.contains("not a duration"), "{:?}", d.0[0]);
        assert!(d.0[1].detail.contains("zero"), "{:?}", d.0[1]);
        assert!(d.0[2].detail.contains("negative"), "{:?}", d.0[2]);
        // Configure refuses them too (values unknown at validate time are only checked there).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(AgentplaneProvider.configure(&c)).is_err());
    }

    #[test]
    fn bad_endpoint_url_is_reported_with_path() {
        let ep = Value::Object(BTreeMap::from([(
            "sqs".into(),
            Value::string("127.0.0.1:5000"),
        )]));
        let mut d = Diagnostics::new();
        AgentplaneProvider.validate(&cfg(&[("endpoints", Value::List(vec![ep]))]), &mut d);
        assert_eq!(
            d.0[0].path.as_ref().unwrap().to_string(),
            "endpoints[0].sqs"
        );
    }
}
