//! The embedded runtime behind `agentplane dev`: gateway + controller + worker in one process over the
//! SQLite store and queue. Same state machine, policy and HTTP API as the distributed runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentplane_api::policy::{
    AgentPolicySpec, EndpointKind, IntentRule, ModelTier, RateLimitAction, UnlistedIntents,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, AuditLogConfig, AuditedStore, Ed25519Signer, LogError};
use crate::controller::Controller;
use crate::controller::breaker::BreakerWatch;
use crate::gateway::serve::{self, ServeError, TlsFiles};
use crate::gateway::{self, AppState, GatewayConfig};
use crate::metrics::Metrics;
use crate::models::Models;
use crate::queue::DynQueue;
use crate::queue::sqlite::{Redrive, SqliteQueue};
use crate::store::journal::SqliteJournal;
use crate::store::sqlite::{Db, SqliteStore};
use crate::store::{DynStore, StoreError, hash_secret};
use crate::worker::plan::PlanSupport;
use crate::worker::{Worker, WorkerConfig};

pub const QUEUE_NAME: &str = "tasks";
pub const DEAD_LETTER_QUEUE_NAME: &str = "tasks-dlq";

#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub namespace: String,
    /// Join tokens to accept (in addition to any already stored). When empty, one is generated.
    pub join_tokens: Vec<String>,
    pub join_token_ttl: Duration,
    pub tls: Option<TlsFiles>,
    pub gateway: GatewayConfig,
    pub worker: WorkerConfig,
    pub max_receive_count: u32,
    pub resync: Duration,
    /// Record every admission, decision, approval and transition in the tamper-evident audit log
    /// (`<data dir>/audit.sqlite`, checkpoints signed with the Ed25519 key `<data dir>/audit.key`).
    /// Off only to measure what it costs (`agentplane dev-bench`).
    pub audit: bool,
    /// The policy seeded into a data directory that has none (default: [`default_policy`]).
    pub initial_policy: Option<AgentPolicySpec>,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            data_dir: PathBuf::from(".agentplane"),
            namespace: "default".into(),
            join_tokens: Vec::new(),
            join_token_ttl: Duration::from_secs(3600),
            tls: None,
            gateway: GatewayConfig::default(),
            worker: WorkerConfig::default(),
            max_receive_count: 3,
            resync: Duration::from_secs(10),
            audit: true,
            initial_policy: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("data directory {path} is in use by another agentplane process")]
    Locked { path: PathBuf },
    #[error("no randomness for a join token: {0}")]
    Random(String),
    #[error(transparent)]
    Audit(#[from] LogError),
}

/// The audit log file and its signing key, in the data directory.
pub const AUDIT_LOG_FILE: &str = "audit.sqlite";
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// How long the embedded audit log gathers appends before committing them (`batch_window`).
const AUDIT_BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

/// The origin line of the embedded runtime's checkpoints for `namespace`.
pub fn audit_origin(namespace: &str) -> String {
    format!("agentplane.dev/audit/{namespace}")
}

/// A running embedded runtime.
pub struct Embedded {
    pub addr: SocketAddr,
    pub tls: bool,
    pub store: DynStore,
    pub queue: DynQueue,
    pub metrics: Arc<Metrics>,
    /// The audit log every store write is recorded in (`None` when `EmbeddedConfig::audit` is off).
    pub audit: Option<Arc<AuditLog>>,
    /// The join token generated at start-up, when none was configured.
    pub generated_join_token: Option<String>,
    audited: Option<Arc<AuditedStore>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Held while running: one process per data directory (see `release_orphaned_leases`).
    _lock: std::fs::File,
}

/// The policy seeded into an empty data directory: everything on the builtin echo model, `purchase`
/// needs approval, `shell` is refused, and `admin` may approve.
pub fn default_policy() -> AgentPolicySpec {
    let rule = |kind: &str, allowed: bool, requires_approval: bool| IntentRule {
        kind: kind.into(),
        allowed,
        requires_approval,
        privacy_levels: vec![],
        rate_limits: vec![],
        on_rate_limit: RateLimitAction::Deny,
        tools: vec![],
        max_steps: None,
    };
    AgentPolicySpec {
        suspend: false,
        intents: vec![rule("purchase", true, true), rule("shell", false, false)],
        unlisted_intents: UnlistedIntents::Allow,
        models: vec![ModelTier {
            name: "builtin".into(),
            endpoint_kind: EndpointKind::Builtin,
            endpoint: "builtin:echo".into(),
            model: None,
            price_per_1k_input_micros: 100,
            price_per_1k_output_micros: 200,
            privacy_levels: vec![],
            gpu: false,
            secret_ref: None,
        }],
        budgets: vec![],
        approvers: vec!["admin".into()],
        ..Default::default()
    }
}

/// A random URL-safe secret (join tokens, approver tokens).
pub fn random_token() -> Result<String, RuntimeError> {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).map_err(|e| RuntimeError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Takes the data directory's exclusive lock (released by the OS when the process dies, even by SIGKILL).
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, RuntimeError> {
    let path = dir.join("agentplane.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| RuntimeError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RuntimeError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(RuntimeError::DataDir { path, source }),
    }
}

/// Opens `<data dir>/audit.sqlite` with the key `<data dir>/audit.key` (created on first start).
async fn open_audit_log(cfg: &EmbeddedConfig) -> Result<Arc<AuditLog>, RuntimeError> {
    let signer = Ed25519Signer::load_or_create(&cfg.data_dir.join(AUDIT_KEY_FILE))
        .map_err(LogError::from)?;
    let mut config = AuditLogConfig::new(
        cfg.data_dir.join(AUDIT_LOG_FILE),
        audit_origin(&cfg.namespace),
    );
    // Leaves are fsynced by each checkpoint's commit (every 256 leaves or 10 s) rather than one by
    // one: the same durability as the task store beside it (WAL, synchronous=NORMAL: safe against a
    // process crash), and a signed checkpoint never covers leaves an OS crash could take back. An
    // fsync per append on the runtime's hot path cost more than the rest of governance together.
    config.fsync_appends = false;
    // Nobody waits for an append here (the store is pipelined), so appends can gather for a moment
    // and share a transaction (fewer wake-ups and WAL page writes per leaf; see ci/bench/runtime).
    config.batch_window = AUDIT_BATCH_WINDOW;
    let log = AuditLog::open(config, Arc::new(signer)).await?;
    tracing::info!(log = %log.path().display(), key_id = log.public_key().key_id(), "audit log open");
    Ok(log)
}

/// Signs the tail of the log (so the next start, and `agentplane audit verify`, find every leaf
/// covered) and closes it. Failures are logged: the leaves are durable already, only unsigned.
pub async fn close_audit_log(log: &AuditLog) {
    if let Err(e) = log.checkpoint_if_new().await {
        tracing::error!(error = %e, log = %log.path().display(), "final audit checkpoint failed");
    }
    if let Err(e) = log.close().await {
        tracing::error!(error = %e, log = %log.path().display(), "closing the audit log failed");
    }
}

impl Embedded {
    pub async fn start(cfg: EmbeddedConfig) -> Result<Embedded, RuntimeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| RuntimeError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let lock = lock_data_dir(&cfg.data_dir)?;
        let db = Db::open(&cfg.data_dir.join("agentplane.sqlite"))?;
        let metrics = Arc::new(Metrics::default());
        let store: DynStore = SqliteStore::new(db.clone(), cfg.namespace.clone());
        // Wrapped before anything else gets the store: every write the gateway, controller and
        // worker make is then recorded.
        let (store, audit, audited) = if cfg.audit {
            let log = open_audit_log(&cfg).await?;
            log.attach_metrics(metrics.clone()).await?;
            // Pipelined: a write waits for its events to be queued to the log, not fsynced, so the
            // controller (one task at a time) is not held to the log's fsync rate. See
            // `AuditedStore::pipelined` for what that trades.
            let audited = AuditedStore::pipelined(store, log.clone());
            let store: DynStore = audited.clone();
            (store, Some(log), Some(audited))
        } else {
            (store, None, None)
        };
        let main_queue = SqliteQueue::new(
            db.clone(),
            QUEUE_NAME,
            Some(Redrive {
                dead_letter_queue: DEAD_LETTER_QUEUE_NAME.into(),
                max_receive_count: cfg.max_receive_count.max(1),
            }),
        );
        let orphaned = main_queue
            .release_orphaned_leases()
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        if orphaned > 0 {
            tracing::info!(
                orphaned,
                "made messages leased before the last stop visible again"
            );
        }
        let queue: DynQueue = main_queue;
        let journal_db = db.clone();
        let dead_letters: DynQueue = SqliteQueue::new(db, DEAD_LETTER_QUEUE_NAME, None);

        if store.get_policy().await?.is_none() {
            tracing::info!("no AgentPolicy yet; seeding the default policy");
            store
                .put_policy(cfg.initial_policy.clone().unwrap_or_else(default_policy))
                .await?;
        }
        let now = jiff::Timestamp::now();
        let expires = jiff::SignedDuration::try_from(cfg.join_token_ttl)
            .ok()
            .and_then(|ttl| now.checked_add(ttl).ok())
            .unwrap_or(jiff::Timestamp::MAX);
        let mut generated_join_token = None;
        let mut tokens = cfg.join_tokens.clone();
        if tokens.is_empty() {
            let t = random_token()?;
            generated_join_token = Some(t.clone());
            tokens.push(t);
        }
        for t in &tokens {
            store.add_join_token(&hash_secret(t), expires).await?;
        }

        let shutdown = CancellationToken::new();
        let bound = serve::bind(cfg.listen, cfg.tls.as_ref()).await?;
        let addr = bound.local_addr().map_err(ServeError::Io)?;
        let tls = bound.is_tls();
        let router = gateway::router(AppState::new(
            store.clone(),
            metrics.clone(),
            cfg.gateway.clone(),
            shutdown.clone(),
        ));

        let mut tasks = Vec::new();
        let s = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve::serve(bound, router, s).await {
                tracing::error!(error = %e, "gateway stopped with an error");
            }
        }));
        let controller = Controller {
            store: store.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            resync: cfg.resync,
        };
        tasks.push(tokio::spawn(controller.run(shutdown.clone())));
        // The circuit breaker: no Kubernetes here, so a trip is recorded by the audit leaf (the
        // audited store appends it), the metric and a warning log line.
        let breaker = BreakerWatch {
            store: store.clone(),
            metrics: metrics.clone(),
            notifier: None,
        };
        tasks.push(tokio::spawn(breaker.run(shutdown.clone())));
        let worker = Arc::new(Worker {
            store: store.clone(),
            queue: queue.clone(),
            dead_letters,
            // Remote tiers read their API keys from `<data dir>/secrets/<secret name>/<key>`.
            models: Arc::new(
                Models::new(Arc::new(crate::secrets::FileSecrets::new(
                    cfg.data_dir.join("secrets"),
                )))
                .map_err(|e| StoreError::Backend(e.to_string()))?,
            ),
            metrics: metrics.clone(),
            config: cfg.worker.clone(),
            // Plans journal their steps in the same database as the tasks; MCP servers' secrets
            // come from the same directory as model keys.
            plans: PlanSupport::new(
                Some(Arc::new(SqliteJournal::new(journal_db).await?)),
                Some(Arc::new(crate::secrets::FileSecrets::new(
                    cfg.data_dir.join("secrets"),
                ))),
            ),
        });
        tasks.push(tokio::spawn(worker.run(shutdown.clone())));
        tracing::info!(%addr, tls, data_dir = %cfg.data_dir.display(), "agentplane dev runtime started");
        Ok(Embedded {
            addr,
            tls,
            store,
            queue,
            metrics,
            audit,
            audited,
            generated_join_token,
            shutdown,
            tasks,
            _lock: lock,
        })
    }

    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// A token that cancels when the runtime is asked to stop.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting work, lets in-flight requests and attempts finish (bounded), signs a last
    /// audit checkpoint over the tail of the log, closes it, and returns.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
            {
                tracing::warn!("a runtime task did not stop within 10 s");
            }
        }
        if let Some(audited) = &self.audited {
            audited.settle().await;
            if let Err(e) = audited.retry_backlog().await {
                tracing::error!(
                    error = %e,
                    "audit events could not be appended before the stop; they are lost"
                );
            }
        }
        if let Some(log) = &self.audit {
            close_audit_log(log).await;
        }
    }
}
