//! The distributed subcommands: `agentplane operator`, `agentplane worker`, `agentplane gateway`.
//! Their flags and environment variables are the runtime contract the Helm chart implements
//! (charts/agentplane/README.md, "The runtime contract").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentplane::audit::checkpoint::{MAX_ORIGIN_LEN, check_origin};
use agentplane::audit::{
    AuditLog, AuditLogConfig, CheckpointSigner, Ed25519Signer, KmsSigner, TaskObserver,
};
use agentplane::cloud;
use agentplane::controller::gpu_job::{GpuJobTemplate, JobDispatchQueue};
use agentplane::controller::operator::{self, OperatorConfig};
use agentplane::gateway::serve::{self, TlsFiles};
use agentplane::gateway::{self, AppState, ApproverCredential, GatewayConfig};
use agentplane::metrics::Metrics;
use agentplane::policy::rego::{KubeConfigMaps, RegoPolicies};
use agentplane::queue::DynQueue;
use agentplane::queue::sqs::SqsQueue;
use agentplane::runtime::{audit_origin, close_audit_log};
use agentplane::store::kube_journal::KubeJournal;
use agentplane::store::kubernetes::KubeStore;
use agentplane::store::{DynStore, TaskStore, hash_secret};
use agentplane::telemetry;
use agentplane::worker::one_task::{self, OneTaskQueue};
use agentplane::worker::plan::PlanSupport;
use agentplane::worker::{Handled, Worker, WorkerConfig};
use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::dev::{parse_approver, wait_for_signal};

/// Flags every distributed component takes.
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Namespace whose AgentTasks, EdgeDevices and AgentPolicy this process serves.
    #[arg(long, env = "AGENTPLANE_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Kubeconfig to use instead of the in-cluster service account / KUBECONFIG / ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Address of the plain-HTTP /metrics and /healthz listener.
    #[arg(
        long,
        env = "AGENTPLANE_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    metrics_listen: SocketAddr,
    /// Log format: json or text.
    #[arg(long, env = "AGENTPLANE_LOG_FORMAT", default_value = "json")]
    log_format: String,
    /// AWS region (else the SDK's default chain).
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// AWS endpoint override (an emulator or another SQS/KMS-compatible service).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    aws_endpoint_url: Option<String>,
    /// YAML file with the cluster's model tier ladder (`tiers: [...]`), used by namespaces whose
    /// AgentPolicy lists no models.
    #[arg(long, env = "AGENTPLANE_MODEL_TIERS_FILE")]
    model_tiers_file: Option<PathBuf>,
}

impl CommonArgs {
    async fn store(&self) -> anyhow::Result<(kube::Client, Arc<KubeStore>)> {
        let client = cloud::kube_client(self.kubeconfig.as_deref()).await?;
        let tiers = match &self.model_tiers_file {
            // A missing file is what the chart mounts when no tiers are configured: not an error.
            Some(p) if p.exists() => cloud::read_tiers(p)?,
            _ => Vec::new(),
        };
        let store = KubeStore::with_default_tiers(client.clone(), &self.namespace, tiers);
        Ok((client, store))
    }

    async fn sqs(&self) -> aws_sdk_sqs::Client {
        let config = cloud::aws_config(self.region.clone(), self.aws_endpoint_url.clone()).await;
        aws_sdk_sqs::Client::new(&config)
    }
}

#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// URL of the SQS task queue.
    #[arg(long, env = "AGENTPLANE_QUEUE_URL")]
    queue_url: String,
    /// GPU Job template (YAML: `template` = the pod, `ttlSecondsAfterFinished`, `backoffLimit`,
    /// `activeDeadlineSeconds`). Given: a task needing GPUs runs as a Job on the GPU pool instead of
    /// going to SQS. Unset: GPU tasks go to the queue like any other (no GPU pool).
    #[arg(long, env = "AGENTPLANE_GPU_JOB_TEMPLATE")]
    gpu_job_template: Option<PathBuf>,
    /// Name of the Lease the operator replicas compete for.
    #[arg(
        long,
        env = "AGENTPLANE_LEASE_NAME",
        default_value = "agentplane-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease [default: --namespace].
    #[arg(long, env = "AGENTPLANE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease [default: a random id].
    #[arg(long, env = "AGENTPLANE_POD_NAME")]
    identity: Option<String>,
    /// Reconciles in flight at once.
    #[arg(long, env = "AGENTPLANE_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "AGENTPLANE_LEASE_DURATION_SECS", default_value_t = 15)]
    lease_duration_secs: u64,
    /// Tamper-evident audit log (a SQLite file) this replica records every task state it observes
    /// into while it leads. Unset: no audit log. Keep it on a persistent volume: a log that does not
    /// survive a restart proves nothing.
    #[arg(long, env = "AGENTPLANE_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// AWS KMS key (KeySpec ECC_NIST_P256, KeyUsage SIGN_VERIFY) that signs the audit log's
    /// checkpoints. Without it, --audit-key-file does.
    #[arg(
        long,
        env = "AGENTPLANE_AUDIT_KMS_KEY_ID",
        requires = "audit_log",
        conflicts_with = "audit_key_file"
    )]
    audit_kms_key_id: Option<String>,
    /// Local Ed25519 key file that signs the audit log's checkpoints when no KMS key is given
    /// (created, mode 0600, if missing) [default: audit.key beside --audit-log].
    #[arg(long, env = "AGENTPLANE_AUDIT_KEY_FILE", requires = "audit_log")]
    audit_key_file: Option<PathBuf>,
    /// Origin the audit log's checkpoints name: 1 to 256 bytes, no newlines or other control
    /// characters. Give each replica's log its own (the chart uses
    /// `agentplane.dev/audit/<namespace>/<pod name>`) so a checkpoint names the log it belongs to.
    /// A log keeps the origin it was created with and refuses to open under another
    /// [default: agentplane.dev/audit/<--namespace>].
    #[arg(
        long,
        env = "AGENTPLANE_AUDIT_ORIGIN",
        requires = "audit_log",
        value_parser = parse_audit_origin
    )]
    audit_origin: Option<String>,
}

/// Why an `--audit-origin` was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "--audit-origin (AGENTPLANE_AUDIT_ORIGIN) must be 1 to {max} bytes without newlines or other control characters: it is the first line of every signed checkpoint",
    max = MAX_ORIGIN_LEN
)]
struct BadAuditOrigin;

/// Checks an audit origin when the flags are parsed, so a bad one stops the operator before it
/// connects to anything.
fn parse_audit_origin(raw: &str) -> Result<String, BadAuditOrigin> {
    check_origin(raw).map_err(|_| BadAuditOrigin)?;
    Ok(raw.to_owned())
}

impl OperatorArgs {
    /// The origin of this replica's audit log: the flag, else the namespace's default.
    fn audit_origin(&self) -> String {
        self.audit_origin
            .clone()
            .unwrap_or_else(|| audit_origin(&self.common.namespace))
    }
}

/// Opens the operator's audit log with the signer its flags choose.
async fn open_operator_audit(
    args: &OperatorArgs,
    path: &std::path::Path,
) -> anyhow::Result<Arc<AuditLog>> {
    let signer: Arc<dyn CheckpointSigner> = match &args.audit_kms_key_id {
        Some(key_id) => {
            let aws = cloud::aws_config(
                args.common.region.clone(),
                args.common.aws_endpoint_url.clone(),
            )
            .await;
            Arc::new(
                KmsSigner::new(aws_sdk_kms::Client::new(&aws), key_id.clone())
                    .await
                    .with_context(|| format!("audit checkpoint key {key_id}"))?,
            )
        }
        None => {
            let key_file = args.audit_key_file.clone().unwrap_or_else(|| {
                path.parent()
                    .unwrap_or_else(|| std::path::Path::new("."))
                    .join("audit.key")
            });
            Arc::new(
                Ed25519Signer::load_or_create(&key_file)
                    .with_context(|| format!("audit checkpoint key {}", key_file.display()))?,
            )
        }
    };
    let described = signer.describe();
    let origin = args.audit_origin();
    let log = AuditLog::open(AuditLogConfig::new(path, origin.clone()), signer)
        .await
        .with_context(|| format!("opening the audit log {}", path.display()))?;
    tracing::info!(log = %path.display(), %origin, signer = %described, "audit log open");
    Ok(log)
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Run this one task (NAMESPACE/NAME) and exit, instead of consuming the queue: what a GPU
    /// Job's pod runs. Exits 0 once the task is finished (by this run or before it), parked at a
    /// plan step for an approver, or handed back because the namespace is suspended (the operator
    /// runs the rest on a new Job), 1 when it should be retried (the Job's backoffLimit retries
    /// it), 2 when there is no such task.
    #[arg(long, value_parser = parse_task_flag)]
    task: Option<(String, String)>,
    /// URL of the SQS task queue.
    #[arg(long, env = "AGENTPLANE_QUEUE_URL", required_unless_present = "task")]
    queue_url: Option<String>,
    /// URL of its dead-letter queue (tasks whose messages land there are marked Failed).
    #[arg(long, env = "AGENTPLANE_DLQ_URL", required_unless_present = "task")]
    dlq_url: Option<String>,
    /// Seconds a received message stays hidden; heartbeats extend it while a task runs.
    #[arg(long, env = "AGENTPLANE_VISIBILITY_TIMEOUT_SECS", default_value_t = 60)]
    visibility_timeout_secs: u64,
    /// Long-poll wait per receive, in seconds (SQS allows at most 20).
    #[arg(long, env = "AGENTPLANE_WAIT_SECS", default_value_t = 20)]
    wait_secs: u64,
    /// Tasks run at once by this process.
    #[arg(long, env = "AGENTPLANE_WORKERS", default_value_t = 4)]
    workers: usize,
    /// KMS key that third-party secrets must be sealed with (Decrypt is pinned to it).
    #[arg(long, env = "AGENTPLANE_KMS_KEY_ID")]
    kms_key_id: Option<String>,
    /// Longest a single model call may take, in seconds.
    #[arg(long, env = "AGENTPLANE_MODEL_TIMEOUT_SECS", default_value_t = 120)]
    model_timeout_secs: u64,
}

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to serve the device API on. Plain HTTP only on loopback; else --tls-cert/--tls-key.
    #[arg(long, env = "AGENTPLANE_LISTEN", default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "AGENTPLANE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "AGENTPLANE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// One-time enrollment token to accept (repeatable, comma-separated in the environment).
    #[arg(
        long = "join-token",
        env = "AGENTPLANE_JOIN_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    join_tokens: Vec<String>,
    /// Hours a join token given here stays valid.
    #[arg(long, env = "AGENTPLANE_JOIN_TOKEN_TTL_HOURS", default_value_t = 24)]
    join_token_ttl_hours: u64,
    /// Approver credential NAME=TOKEN (repeatable, comma-separated in the environment).
    #[arg(
        long = "approver",
        env = "AGENTPLANE_APPROVERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    approvers: Vec<String>,
    /// Largest request body in bytes.
    #[arg(long, env = "AGENTPLANE_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Seconds a request (body upload included) may take before a 408.
    #[arg(long, env = "AGENTPLANE_REQUEST_TIMEOUT_SECS", default_value_t = 15)]
    request_timeout_secs: u64,
}

fn parse_task_flag(raw: &str) -> Result<(String, String), String> {
    one_task::parse_task_ref(raw)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs `main` on a new runtime with logging and span export set up inside it (the exports are sent
/// from it), then flushes the spans still batched while the runtime is still there to send them.
fn run_service(
    log_format: &str,
    service: &str,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    let telemetry = {
        let _in = rt.enter();
        telemetry::init(log_format, service).context("setting up logs and traces")?
    };
    let result = rt.block_on(main);
    telemetry.shutdown();
    result
}

/// Cancels the returned token on SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down");
        t.cancel();
    });
    token
}

async fn start_metrics(
    common: &CommonArgs,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (addr, handle) = cloud::serve_metrics(
        common.metrics_listen,
        metrics.clone(),
        Arc::new(|| true),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "metrics listening");
    Ok(handle)
}

pub fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    let log_format = args.common.log_format.clone();
    run_service(&log_format, "agentplane-operator", async move {
        let shutdown = shutdown_on_signal();
        let (client, store) = args.common.store().await?;
        let sqs: DynQueue = SqsQueue::new(args.common.sqs().await, args.queue_url.clone());
        let queue: DynQueue = match &args.gpu_job_template {
            Some(path) => {
                let template = GpuJobTemplate::read(path)?;
                tracing::info!(template = %path.display(), "GPU tasks run as Jobs on the GPU pool");
                Arc::new(JobDispatchQueue::new(
                    sqs,
                    client.clone(),
                    &args.common.namespace,
                    template,
                ))
            }
            None => {
                tracing::info!(
                    "no --gpu-job-template (AGENTPLANE_GPU_JOB_TEMPLATE): GPU tasks go to the worker queue"
                );
                sqs
            }
        };
        let metrics = Arc::new(Metrics::default());
        // Opened before anything runs: an operator told to keep a log it cannot open must not run
        // unaudited.
        let audit_log = match &args.audit_log {
            Some(path) => {
                let log = open_operator_audit(&args, path).await?;
                log.attach_metrics(metrics.clone()).await?;
                Some(log)
            }
            None => {
                tracing::warn!(
                    "no --audit-log (AGENTPLANE_AUDIT_LOG): task history is not recorded in an audit log"
                );
                None
            }
        };
        let metrics_task = start_metrics(&args.common, &metrics, &shutdown).await?;
        let config = OperatorConfig {
            audit: audit_log
                .as_ref()
                .map(|log| TaskObserver::new(log.clone(), args.common.namespace.clone())),
            concurrency: args.concurrency,
            lease_name: args.lease_name.clone(),
            lease_namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| args.common.namespace.clone()),
            identity: args
                .identity
                .clone()
                .unwrap_or_else(|| OperatorConfig::default().identity),
            lease_duration_secs: args.lease_duration_secs,
            lease_grace_secs: (args.lease_duration_secs / 3).max(1),
            gpu_jobs: args.gpu_job_template.is_some(),
            ..OperatorConfig::default()
        };
        tracing::info!(namespace = %args.common.namespace, identity = %config.identity, "agentplane operator starting");
        let ran = operator::run(client, store, queue, metrics, config, shutdown.clone()).await;
        // Signs the tail, so the log verifies with every leaf covered.
        if let Some(log) = &audit_log {
            close_audit_log(log).await;
        }
        ran.context("running the operator")?;
        shutdown.cancel();
        let _ = metrics_task.await;
        anyhow::Ok(())
    })
}

pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let log_format = args.common.log_format.clone();
    run_service(&log_format, "agentplane-worker", async move {
        let shutdown = shutdown_on_signal();
        let (client, store) = args.common.store().await?;
        let (queue, dead_letters): (DynQueue, DynQueue) = match (&args.queue_url, &args.dlq_url) {
            (Some(queue_url), Some(dlq_url)) if args.task.is_none() => {
                let sqs = args.common.sqs().await;
                (
                    SqsQueue::new(sqs.clone(), queue_url.clone()),
                    SqsQueue::new(sqs, dlq_url.clone()),
                )
            }
            _ => (Arc::new(OneTaskQueue), Arc::new(OneTaskQueue)),
        };
        let aws = cloud::aws_config(
            args.common.region.clone(),
            args.common.aws_endpoint_url.clone(),
        )
        .await;
        let secrets = crate::cloud_models::secrets(
            client.clone(),
            &args.common.namespace,
            &aws,
            args.kms_key_id.clone(),
        );
        let models = crate::cloud_models::models(secrets.clone())?;
        // Plans journal each step as an AgentTaskStep; MCP servers' secrets come from the same
        // KMS-sealed Secrets as model keys; Rego modules may live in ConfigMaps.
        let mut plans = PlanSupport::new(
            Some(Arc::new(KubeJournal::new(
                client.clone(),
                &args.common.namespace,
            ))),
            Some(secrets),
        );
        plans.rego = RegoPolicies::new(Some(Arc::new(KubeConfigMaps::new(
            client,
            &args.common.namespace,
        ))));
        let metrics = Arc::new(Metrics::default());
        let store: DynStore = store;
        let worker = Arc::new(Worker {
            store,
            queue,
            dead_letters,
            models,
            metrics: metrics.clone(),
            config: WorkerConfig {
                concurrency: args.workers.max(1),
                visibility: Duration::from_secs(args.visibility_timeout_secs.clamp(1, 43_200)),
                wait: Duration::from_secs(args.wait_secs.min(20)),
                call_timeout: Duration::from_secs(args.model_timeout_secs.max(1)),
                ..WorkerConfig::default()
            },
            plans,
        });
        if let Some((namespace, name)) = &args.task {
            return run_one_task(&worker, namespace, name).await;
        }
        let metrics_task = start_metrics(&args.common, &metrics, &shutdown).await?;
        tracing::info!(namespace = %args.common.namespace, queue = ?args.queue_url, "agentplane worker starting");
        worker.run(shutdown.clone()).await;
        shutdown.cancel();
        let _ = metrics_task.await;
        anyhow::Ok(())
    })
}

/// `agentplane worker --task`: runs the task once and exits with a code the Job understands.
async fn run_one_task(worker: &Worker, namespace: &str, name: &str) -> anyhow::Result<()> {
    tracing::info!(task = %format!("{namespace}/{name}"), "running one task");
    let handled = one_task::run_one(worker, namespace, name)
        .await
        .with_context(|| format!("running task {namespace}/{name}"))?;
    let (code, what) = match handled {
        None => (2, "no such task"),
        Some(Handled::Succeeded) => (0, "succeeded"),
        Some(Handled::Failed) => (0, "failed for good; the reason is in its status"),
        Some(Handled::Dropped) => (0, "already finished or cancelled: nothing done"),
        Some(Handled::Released) => (1, "not runnable yet (not queued yet, or taken)"),
        // Exit 0 frees the GPU: the operator runs the task on a new Job once suspend is cleared.
        Some(Handled::Suspended) => (0, "suspended: handed back, stays Queued"),
        Some(Handled::Retry) => (1, "attempt failed; to be retried"),
        // The Job is done: once the step is approved the operator runs the rest on a new Job.
        Some(Handled::Parked) => (0, "waits at a plan step for an approver"),
    };
    println!("task {namespace}/{name}: {what}");
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

pub fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let approvers = args
        .approvers
        .iter()
        .map(|a| parse_approver(a).map(|(name, token)| ApproverCredential::new(name, &token)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let log_format = args.common.log_format.clone();
    run_service(&log_format, "agentplane-gateway", async move {
        let shutdown = shutdown_on_signal();
        let (client, store) = args.common.store().await?;
        let expires = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(
                i64::try_from(args.join_token_ttl_hours)
                    .unwrap_or(i64::MAX / 3600)
                    .min(24 * 365),
            ))
            .unwrap_or(jiff::Timestamp::MAX);
        for t in &args.join_tokens {
            store
                .add_join_token(&hash_secret(t), expires)
                .await
                .context("storing a join token")?;
        }
        let metrics = Arc::new(Metrics::default());
        let metrics_task = start_metrics(&args.common, &metrics, &shutdown).await?;
        let bound = serve::bind(args.listen, tls.as_ref())
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = bound.local_addr()?;
        let store: DynStore = store;
        let mut state = AppState::new(
            store,
            metrics,
            GatewayConfig {
                max_body_bytes: args.max_body_bytes,
                request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
                approvers,
                ..GatewayConfig::default()
            },
            shutdown.clone(),
        );
        // Rego modules may live in ConfigMaps; the operator, not the gateway, reports loads on
        // the AgentPolicy.
        state.rego = Arc::new(RegoPolicies::new(Some(Arc::new(KubeConfigMaps::new(
            client.clone(),
            &args.common.namespace,
        )))));
        let router = gateway::router(state);
        tracing::info!(%addr, tls = bound.is_tls(), namespace = %args.common.namespace, "agentplane gateway listening");
        // Printed for scripts that start the gateway on port 0.
        println!(
            "agentplane gateway listening on {}://{addr}",
            if bound.is_tls() { "https" } else { "http" }
        );
        serve::serve(bound, router, shutdown.clone())
            .await
            .context("serving the gateway")?;
        shutdown.cancel();
        let _ = metrics_task.await;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        operator: OperatorArgs,
    }

    fn parse(extra: &[&str]) -> Result<OperatorArgs, clap::Error> {
        let mut argv = vec![
            "operator",
            "--queue-url",
            "http://127.0.0.1:1/q",
            "--namespace",
            "team-a",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.operator)
    }

    #[test]
    fn audit_origin_defaults_to_the_namespace() {
        let args = parse(&["--audit-log", "/tmp/a.sqlite"]).unwrap();
        assert_eq!(args.audit_origin(), "agentplane.dev/audit/team-a");
    }

    #[test]
    fn audit_origin_flag_overrides_the_default() {
        let args = parse(&[
            "--audit-log",
            "/tmp/a.sqlite",
            "--audit-origin",
            "agentplane.dev/audit/team-a/agentplane-operator-1",
        ])
        .unwrap();
        assert_eq!(
            args.audit_origin(),
            "agentplane.dev/audit/team-a/agentplane-operator-1"
        );
    }

    #[test]
    fn bad_audit_origins_are_refused_naming_the_flag() {
        let long = "x".repeat(MAX_ORIGIN_LEN + 1);
        for bad in ["", "a\nb", "tab\there", long.as_str()] {
            let err = parse(&["--audit-log", "/tmp/a.sqlite", "--audit-origin", bad])
                .expect_err("refused")
                .to_string();
            assert!(err.contains("--audit-origin"), "{bad:?}: {err}");
            assert!(err.contains("AGENTPLANE_AUDIT_ORIGIN"), "{bad:?}: {err}");
        }
        let longest = "x".repeat(MAX_ORIGIN_LEN);
        assert!(parse(&["--audit-log", "/tmp/a.sqlite", "--audit-origin", &longest]).is_ok());
    }

    #[test]
    fn audit_origin_needs_an_audit_log() {
        let err = parse(&["--audit-origin", "agentplane.dev/audit/x"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }
}
