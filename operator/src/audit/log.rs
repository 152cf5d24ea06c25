//! The append-only audit log: one SQLite file (WAL, `synchronous=FULL`) holding the leaves, the
//! perfect-subtree hashes completed so far, the signing keys and the signed checkpoints.
//!
//! Like the task store, one OS thread owns the connection and is fed by a bounded channel. Appends that
//! arrive while it is busy are committed together (group commit): one transaction and one fsync for the
//! batch, each caller answered after the commit. The thread keeps the tree's right edge
//! ([`Frontier`]) in memory, so an append hashes O(log n) (amortised O(1)) nodes and stores every node it
//! completes; roots and proofs for any size are then answered from O(log² n) stored nodes, never by
//! rehashing the leaves. The offline verifier does not trust those nodes: it recomputes everything from
//! the leaf bytes (see `verify`).
//!
//! Appends are idempotent by an event key chosen by the caller (e.g. `ns/task@version/phase`): appending
//! a key again returns the seq it already has, so a replayed watch event or a retried write never adds
//! a second leaf.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::AuditEvent;
use super::checkpoint::{
    CheckpointSigner, SignedCheckpoint, SignerError, TrustedKey, check_origin,
};
use super::merkle::{self, Frontier, Hash, MerkleError, decompose, empty_root, leaf_hash};
use super::schema::{
    FORMAT, SCHEMA, node, read_checkpoint_rows, read_keys, read_leaf, read_meta, subtree,
};
use crate::metrics::Metrics;

/// Jobs waiting for the log's thread; senders wait (backpressure) when it is full.
const JOB_QUEUE_DEPTH: usize = 1024;

/// Most appends committed in one transaction.
const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("audit log {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("audit log database: {0}")]
    Sql(String),
    #[error("the audit log's database thread has stopped")]
    Closed,
    #[error("audit log {path} was created for origin {found:?}, not {expected:?}")]
    OriginMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The stored tree does not match what was signed, or rows are missing. Nothing is appended to a log
    /// in this state; `agentplane audit verify` names the first bad position.
    #[error("audit log is damaged: {0}; run `agentplane audit verify` on it")]
    Corrupt(String),
    #[error("leaf {seq} is not in the log (size {size})")]
    NoSuchLeaf { seq: u64, size: u64 },
    #[error(transparent)]
    Signer(#[from] SignerError),
    #[error(transparent)]
    Merkle(#[from] MerkleError),
    #[error("encoding an audit event: {0}")]
    Encode(String),
}

impl From<rusqlite::Error> for LogError {
    fn from(e: rusqlite::Error) -> Self {
        LogError::Sql(e.to_string())
    }
}

/// Where the log lives and when it signs.
#[derive(Clone, Debug)]
pub struct AuditLogConfig {
    pub path: PathBuf,
    /// Names the log in every checkpoint (e.g. `agentplane.dev/audit/<namespace>`); fixed at creation.
    pub origin: String,
    /// Sign a checkpoint once this many leaves were appended since the last one.
    pub checkpoint_every: u64,
    /// ... or this long after the last one, if any leaf was appended since.
    pub checkpoint_interval: Duration,
    /// Fsync every append before answering it (`synchronous=FULL`, the default). When false, an
    /// append is answered once committed to the WAL (`synchronous=NORMAL`): it survives a process
    /// crash at once, and an OS crash or power cut once a checkpoint covers it, because checkpoints
    /// are still committed with an fsync of the WAL, which holds every leaf before them. A signed
    /// checkpoint therefore never outlives the leaves it covers; what an OS crash can lose is the
    /// tail since the last checkpoint (`checkpoint_every` leaves or `checkpoint_interval` at most).
    pub fsync_appends: bool,
    /// After committing appends, the log's thread rests this long before taking the next ones, so a
    /// steady stream is committed in fewer, larger transactions: fewer thread wake-ups, and the index
    /// pages an append dirties are written to the WAL once per batch instead of once per append.
    /// Every append waits up to this much longer, so it suits writers that do not wait for the log
    /// ([`super::AuditedStore::pipelined`], where it is pure CPU saved); zero (the default) takes
    /// appends as soon as they arrive.
    pub batch_window: Duration,
}

impl AuditLogConfig {
    pub fn new(path: impl Into<PathBuf>, origin: impl Into<String>) -> Self {
        AuditLogConfig {
            path: path.into(),
            origin: origin.into(),
            checkpoint_every: 256,
            checkpoint_interval: Duration::from_secs(10),
            fsync_appends: true,
            batch_window: Duration::ZERO,
        }
    }
}

/// The result of an append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// False when the event key was already in the log (nothing was written).
    pub new: bool,
}

/// One stored leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub seq: u64,
    pub data: Vec<u8>,
    pub hash: Hash,
}

impl Leaf {
    pub fn event(&self) -> Result<AuditEvent, serde_json::Error> {
        AuditEvent::from_leaf(&self.data)
    }
}

type Call = Box<dyn FnOnce(&mut State) + Send>;

/// Who hears how an append went.
enum Reply {
    /// The caller waits for the result.
    Wait(oneshot::Sender<Result<Appended, LogError>>),
    /// Nobody waits; a failure is left in the sink for the caller to collect.
    Detached(Arc<DetachedFailures>),
}

impl Reply {
    fn send(self, key: String, event: AuditEvent, result: Result<Appended, LogError>) {
        match self {
            // The caller may have gone away; the result is then dropped.
            Reply::Wait(tx) => {
                let _ = tx.send(result);
            }
            Reply::Detached(sink) => {
                if let Err(e) = result {
                    sink.push(key, event, e);
                }
            }
        }
    }
}

/// Appends queued with [`AuditLog::enqueue_detached`] that failed, waiting to be collected.
#[derive(Default)]
pub struct DetachedFailures {
    failed: std::sync::Mutex<Vec<(String, AuditEvent, LogError)>>,
    count: AtomicU64,
}

impl DetachedFailures {
    fn push(&self, key: String, event: AuditEvent, error: LogError) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, event, error));
        self.count.fetch_add(1, Ordering::Release);
    }

    /// Whether failures are waiting (cheap: one atomic load).
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Takes the failures collected so far, in the order the appends were queued.
    pub fn take(&self) -> Vec<(String, AuditEvent, LogError)> {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        self.count.store(0, Ordering::Release);
        std::mem::take(&mut *failed)
    }
}

enum Job {
    Append {
        key: String,
        event: AuditEvent,
        reply: Reply,
    },
    Call(Call),
    /// Closes the database and stops the thread; answered once the connection is closed.
    Close(oneshot::Sender<()>),
}

/// What the log's thread owns.
struct State {
    conn: Connection,
    origin: String,
    frontier: Frontier,
    last_checkpoint: Option<SignedCheckpoint>,
    since_checkpoint: u64,
    fsync_appends: bool,
    checkpoint_every: u64,
    batch_window: Duration,
    /// Counts appends in the log's metrics, once attached (answered appends are counted here, on
    /// the log's thread, whether or not anyone waits for them).
    counter: Arc<AppendCounter>,
    due: Arc<Notify>,
}

/// The audit log. Cheap to share (`Arc`); dropping the last handle stops its checkpoint timer and, once
/// queued jobs are done, its thread.
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    origin: String,
    signer: Arc<dyn CheckpointSigner>,
    /// One checkpoint at a time: each is signed over the head it read and stored with the next index.
    checkpointing: tokio::sync::Mutex<()>,
    stop: CancellationToken,
    /// Where appends, failures, the size and checkpoints are counted, once attached.
    counter: Arc<AppendCounter>,
}

/// Counts appends in the metrics attached to a log (shared with [`QueuedAppend`]s).
#[derive(Default)]
struct AppendCounter {
    metrics: std::sync::OnceLock<Arc<Metrics>>,
    /// The largest size reported to `agentplane_audit_log_size`.
    size_seen: AtomicU64,
}

impl AppendCounter {
    fn set_size(&self, metrics: &Metrics, size: u64) {
        // Leaves are appended in seq order, but concurrent callers may report out of order: never
        // move the gauge backwards.
        let size = self.size_seen.fetch_max(size, Ordering::Relaxed).max(size);
        metrics.set_gauge(
            "agentplane_audit_log_size",
            &[],
            i64::try_from(size).unwrap_or(i64::MAX),
        );
    }

    fn count(&self, result: &Result<Appended, LogError>) {
        let Some(m) = self.metrics.get() else { return };
        match result {
            Ok(a) if a.new => {
                m.inc("agentplane_audit_appends_total", &[]);
                self.set_size(m, a.seq.saturating_add(1));
            }
            Ok(_) => {}
            Err(_) => m.inc("agentplane_audit_append_failures_total", &[]),
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl AuditLog {
    /// Opens (creating if needed) the log at `config.path`, checks the stored tree still matches its last
    /// checkpoint, records the signer's public key, and starts the checkpoint timer. Must run inside a
    /// tokio runtime.
    pub async fn open(
        config: AuditLogConfig,
        signer: Arc<dyn CheckpointSigner>,
    ) -> Result<Arc<AuditLog>, LogError> {
        check_origin(&config.origin)?;
        let due = Arc::new(Notify::new());
        let state = {
            let (cfg, key, due) = (config.clone(), signer.public_key().clone(), due.clone());
            tokio::task::spawn_blocking(move || open_state(&cfg, &key, due))
                .await
                .map_err(|e| LogError::Open {
                    path: config.path.clone(),
                    reason: e.to_string(),
                })??
        };
        let counter = Arc::new(AppendCounter::default());
        let mut state = state;
        state.counter = counter.clone();
        let (jobs, rx) = mpsc::channel::<Job>(JOB_QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("agentplane-audit".into())
            .spawn(move || run_thread(state, rx))
            .map_err(|e| LogError::Open {
                path: config.path.clone(),
                reason: e.to_string(),
            })?;
        let log = Arc::new(AuditLog {
            jobs,
            path: config.path.clone(),
            origin: config.origin.clone(),
            signer,
            checkpointing: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            counter,
        });
        spawn_checkpointer(
            Arc::downgrade(&log),
            log.stop.clone(),
            due,
            config.checkpoint_interval,
        );
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn public_key(&self) -> &TrustedKey {
        self.signer.public_key()
    }

    /// Counts this log's appends (`agentplane_audit_appends_total`, new leaves only), failed appends
    /// (`agentplane_audit_append_failures_total`), its size (`agentplane_audit_log_size`) and signed
    /// checkpoints (`agentplane_audit_checkpoints_total`) in `metrics` from now on. The first call
    /// wins; the size is sampled now so the gauge is right before the first append.
    pub async fn attach_metrics(&self, metrics: Arc<Metrics>) -> Result<(), LogError> {
        let metrics = self.counter.metrics.get_or_init(|| metrics).clone();
        let size = self.size().await?;
        self.counter.set_size(&metrics, size);
        Ok(())
    }

    async fn call<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&mut State) -> Result<T, LogError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Call = Box::new(move |state| {
            // The caller may have gone away; the result is then dropped.
            let _ = tx.send(f(state));
        });
        self.jobs
            .send(Job::Call(job))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Appends `event` under `key` (the event's `seq` is assigned here), or returns the seq already
    /// recorded for `key`. Returns once the leaf is fsynced.
    pub async fn append(
        &self,
        key: impl Into<String>,
        event: AuditEvent,
    ) -> Result<Appended, LogError> {
        let (tx, rx) = oneshot::channel();
        self.send_append(key.into(), event, Reply::Wait(tx)).await?;
        rx.await.unwrap_or(Err(LogError::Closed))
    }

    /// Queues an append and returns without waiting for it: appends are committed in the order they
    /// were queued, and every job queued after this one (a checkpoint, [`Self::size`],
    /// [`Self::close`]) runs after it. If it fails, the event and the error are left in `failures`.
    /// Waits only while the queue is full; fails only when the log is closed.
    pub async fn enqueue_detached(
        &self,
        key: impl Into<String>,
        event: AuditEvent,
        failures: &Arc<DetachedFailures>,
    ) -> Result<(), LogError> {
        self.send_append(key.into(), event, Reply::Detached(failures.clone()))
            .await
    }

    async fn send_append(
        &self,
        key: String,
        event: AuditEvent,
        reply: Reply,
    ) -> Result<(), LogError> {
        let sent = self.jobs.send(Job::Append { key, event, reply }).await;
        if sent.is_err() {
            self.counter.count(&Err(LogError::Closed));
            return Err(LogError::Closed);
        }
        Ok(())
    }

    /// Stops the checkpoint timer and closes the database (after the jobs queued before this call).
    /// Later calls on this handle fail with [`LogError::Closed`]. Sign a last checkpoint first if the
    /// tail should be covered.
    pub async fn close(&self) -> Result<(), LogError> {
        self.stop.cancel();
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Close(tx)).await.is_err() {
            return Ok(());
        }
        rx.await.map_err(|_| LogError::Closed)
    }

    /// The number of leaves.
    pub async fn size(&self) -> Result<u64, LogError> {
        self.call(|s| Ok(s.frontier.size())).await
    }

    /// The current tree head: (size, root).
    pub async fn head(&self) -> Result<(u64, Hash), LogError> {
        self.call(|s| Ok((s.frontier.size(), s.frontier.root())))
            .await
    }

    /// MTH of the first `size` leaves.
    pub async fn root_at(&self, size: u64) -> Result<Hash, LogError> {
        self.call(move |s| {
            check_size(size, s.frontier.size())?;
            if size == 0 {
                return Ok(empty_root());
            }
            subtree(&s.conn, 0, size)
        })
        .await
    }

    pub async fn leaf(&self, seq: u64) -> Result<Option<Leaf>, LogError> {
        self.call(move |s| read_leaf(&s.conn, seq)).await
    }

    /// The audit path of leaf `seq` in the tree of the first `size` leaves.
    pub async fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        self.call(move |s| {
            check_size(size, s.frontier.size())?;
            merkle::inclusion_proof(seq, size, |a, b| subtree(&s.conn, a, b))
        })
        .await
    }

    /// The consistency proof from the first `old` leaves to the first `new`.
    pub async fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, LogError> {
        self.call(move |s| {
            check_size(new, s.frontier.size())?;
            merkle::consistency_proof(old, new, |a, b| subtree(&s.conn, a, b))
        })
        .await
    }

    pub async fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, LogError> {
        self.call(|s| Ok(s.last_checkpoint.clone())).await
    }

    /// Every checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>, LogError> {
        self.call(|s| {
            read_checkpoint_rows(&s.conn)?
                .into_iter()
                .map(|r| {
                    r.decode(&s.origin)
                        .map(|(cp, _)| cp)
                        .map_err(LogError::Corrupt)
                })
                .collect()
        })
        .await
    }

    /// Signs the current head now (on demand), even if no leaf was added since the last checkpoint: a
    /// fresh timestamp over the same root is still evidence the log was not rewritten.
    pub async fn checkpoint(&self) -> Result<SignedCheckpoint, LogError> {
        let _one = self.checkpointing.lock().await;
        let head = self.call(|s| prepare_checkpoint(s, false)).await?;
        match head {
            Some(head) => self.sign_and_store(head).await,
            None => Err(LogError::Corrupt("no head to sign".into())),
        }
    }

    /// Signs the current head if leaves were appended since the last checkpoint (or none exists yet and
    /// the log has leaves). The timer and the every-N trigger use this.
    pub async fn checkpoint_if_new(&self) -> Result<Option<SignedCheckpoint>, LogError> {
        let _one = self.checkpointing.lock().await;
        match self.call(|s| prepare_checkpoint(s, true)).await? {
            Some(head) => self.sign_and_store(head).await.map(Some),
            None => Ok(None),
        }
    }

    async fn sign_and_store(&self, head: Head) -> Result<SignedCheckpoint, LogError> {
        let key = self.signer.public_key();
        let mut cp = SignedCheckpoint {
            index: head.index,
            origin: self.origin.clone(),
            size: head.size,
            root: head.root,
            // Never before the previous checkpoint, even if the clock stepped back.
            timestamp_ms: jiff::Timestamp::now()
                .as_millisecond()
                .max(head.min_timestamp_ms),
            key_id: key.key_id().to_owned(),
            algorithm: key.algorithm(),
            signature: Vec::new(),
        };
        cp.signature = self.signer.sign(cp.body().as_bytes()).await?;
        // A signer that returns something its own public key does not accept (a KMS key swapped under
        // the same alias, a bug) must not leave unverifiable checkpoints behind.
        cp.verify(key)?;
        let stored = cp.clone();
        self.call(move |s| store_checkpoint(s, stored, &head.consistency))
            .await?;
        if let Some(m) = self.counter.metrics.get() {
            m.inc("agentplane_audit_checkpoints_total", &[]);
        }
        tracing::debug!(index = cp.index, size = cp.size, "audit checkpoint signed");
        Ok(cp)
    }
}

fn check_size(size: u64, current: u64) -> Result<(), LogError> {
    if size > current {
        return Err(LogError::NoSuchLeaf {
            seq: size - 1,
            size: current,
        });
    }
    Ok(())
}

/// The checkpoint timer: signs when `checkpoint_every` appends asked for it or every `interval`.
fn spawn_checkpointer(
    log: Weak<AuditLog>,
    stop: CancellationToken,
    due: Arc<Notify>,
    interval: Duration,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = due.notified() => {}
                () = tokio::time::sleep(interval) => {}
            }
            let Some(log) = log.upgrade() else { return };
            match log.checkpoint_if_new().await {
                Ok(_) => {}
                // `close` ran while this checkpoint was under way: whoever closed the log signs
                // the tail first if it wants it covered, so nothing is left unsigned by this.
                Err(LogError::Closed) if stop.is_cancelled() => return,
                // Retried at the next tick; leaves stay durable meanwhile, only unsigned.
                Err(e) => {
                    tracing::error!(error = %e, log = %log.path.display(), "audit checkpoint failed")
                }
            }
        }
    });
}

fn open_state(
    config: &AuditLogConfig,
    key: &TrustedKey,
    due: Arc<Notify>,
) -> Result<State, LogError> {
    let open_err = |e: &dyn std::fmt::Display| LogError::Open {
        path: config.path.clone(),
        reason: e.to_string(),
    };
    if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
    }
    let mut conn = Connection::open(&config.path).map_err(|e| open_err(&e))?;
    // FULL: every commit fsyncs the WAL, so an acknowledged leaf survives an OS crash or power cut,
    // not only a process crash (the task store's NORMAL). Audit evidence is worth the fsync, unless
    // the caller chose to fsync at checkpoints only (`fsync_appends`).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let synchronous = if config.fsync_appends {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)?;
        match read_meta(&tx, "format")? {
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('format', ?1)",
                    [FORMAT],
                )?;
            }
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(open_err(&format!("unknown format {f:?}"))),
        }
        match read_meta(&tx, "origin")? {
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('origin', ?1)",
                    [&config.origin],
                )?;
            }
            Some(o) if o == config.origin => {}
            Some(found) => {
                return Err(LogError::OriginMismatch {
                    path: config.path.clone(),
                    found,
                    expected: config.origin.clone(),
                });
            }
        }
        tx.execute(
            "INSERT OR IGNORE INTO keys (key_id, algorithm, spki) VALUES (?1, ?2, ?3)",
            params![key.key_id(), key.algorithm().as_str(), key.spki_der()],
        )?;
        tx.commit()?;
    }

    let (count, max): (i64, Option<i64>) =
        conn.query_row("SELECT COUNT(*), MAX(seq) FROM leaves", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let contiguous = match max {
        None => count == 0,
        Some(m) => m >= 0 && m + 1 == count,
    };
    let count = count as u64;
    if !contiguous {
        return Err(LogError::Corrupt(format!(
            "{count} leaves but the highest seq is {max:?}"
        )));
    }
    let parts = decompose(0, count)
        .into_iter()
        .map(|id| node(&conn, id))
        .collect::<Result<Vec<_>, _>>()?;
    let frontier = Frontier::from_parts(count, parts)?;

    let last_checkpoint = match read_checkpoint_rows(&conn)?.pop() {
        None => None,
        Some(row) => {
            let (cp, _) = row.decode(&config.origin).map_err(LogError::Corrupt)?;
            let root = if cp.size == 0 {
                Some(empty_root())
            } else if cp.size <= count {
                Some(subtree(&conn, 0, cp.size)?)
            } else {
                None
            };
            if root != Some(cp.root) {
                return Err(LogError::Corrupt(format!(
                    "the stored tree does not match checkpoint {} (size {})",
                    cp.index, cp.size
                )));
            }
            let signer_key = read_keys(&conn)?
                .into_iter()
                .find(|k| k.key_id() == cp.key_id)
                .ok_or_else(|| {
                    LogError::Corrupt(format!(
                        "checkpoint {} names key {}, which the log does not hold",
                        cp.index, cp.key_id
                    ))
                })?;
            cp.verify(&signer_key)
                .map_err(|e| LogError::Corrupt(format!("checkpoint {}: {e}", cp.index)))?;
            Some(cp)
        }
    };
    let since_checkpoint = count - last_checkpoint.as_ref().map_or(0, |c| c.size);
    Ok(State {
        conn,
        origin: config.origin.clone(),
        frontier,
        last_checkpoint,
        since_checkpoint,
        fsync_appends: config.fsync_appends,
        checkpoint_every: config.checkpoint_every.max(1),
        batch_window: config.batch_window,
        counter: Arc::new(AppendCounter::default()),
        due,
    })
}

fn run_thread(mut state: State, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.blocking_recv() {
        let deferred = match job {
            Job::Call(f) => {
                f(&mut state);
                None
            }
            Job::Close(reply) => {
                drop(state);
                let _ = reply.send(());
                return;
            }
            Job::Append { key, event, reply } => {
                let mut batch = vec![(key, event, reply)];
                let mut deferred = None;
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Job::Append { key, event, reply }) => batch.push((key, event, reply)),
                        Ok(other) => {
                            // Run after the batch, so jobs still run in the order they were sent
                            // relative to the appends before them.
                            deferred = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let full = batch.len() >= MAX_BATCH;
                append_batch(&mut state, batch);
                if !full && deferred.is_none() && !state.batch_window.is_zero() {
                    // More appends gather in the channel meanwhile (see `batch_window`).
                    std::thread::sleep(state.batch_window);
                }
                deferred
            }
        };
        match deferred {
            Some(Job::Call(f)) => f(&mut state),
            Some(Job::Close(reply)) => {
                drop(state);
                let _ = reply.send(());
                return;
            }
            // Never deferred: appends join the batch.
            Some(Job::Append { .. }) | None => {}
        }
    }
}

type Pending = (String, AuditEvent, Reply);

fn append_batch(state: &mut State, batch: Vec<Pending>) {
    let mut frontier = state.frontier.clone();
    let mut results = Vec::with_capacity(batch.len());
    // Replies are set aside first: every caller gets an answer, even when the batch fails half-way.
    let (mut items, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|(key, event, reply)| ((key, event), reply))
        .unzip();
    let outcome = (|| -> Result<u64, LogError> {
        let tx = state.conn.transaction()?;
        let mut added = 0;
        {
            let mut existing = tx.prepare_cached("SELECT seq FROM leaves WHERE event_key = ?1")?;
            let mut insert_leaf = tx.prepare_cached(
                "INSERT INTO leaves (seq, event_key, data, hash) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut insert_node =
                tx.prepare_cached("INSERT INTO nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
            // By reference: a detached append that fails hands its event back.
            for (key, event) in items.iter_mut() {
                if let Some(seq) = existing
                    .query_row([&*key], |r| r.get::<_, i64>(0))
                    .optional()?
                {
                    results.push(Appended {
                        seq: seq as u64,
                        new: false,
                    });
                    continue;
                }
                let seq = frontier.size();
                event.seq = seq;
                let data = event
                    .to_leaf()
                    .map_err(|e| LogError::Encode(e.to_string()))?;
                let hash = leaf_hash(&data);
                insert_leaf.execute(params![seq as i64, &*key, data, &hash[..]])?;
                for (id, h) in frontier.push(hash) {
                    insert_node.execute(params![id.level, id.index as i64, &h[..]])?;
                }
                results.push(Appended { seq, new: true });
                added += 1;
            }
        }
        tx.commit()?;
        Ok(added)
    })();
    match outcome {
        Ok(added) => {
            state.frontier = frontier;
            state.since_checkpoint += added;
            if state.since_checkpoint >= state.checkpoint_every {
                state.due.notify_one();
            }
            for (((key, event), reply), result) in items.into_iter().zip(replies).zip(results) {
                let result = Ok(result);
                state.counter.count(&result);
                reply.send(key, event, result);
            }
        }
        Err(e) => {
            // The transaction rolled back: nothing of the batch is stored and the frontier is unchanged.
            let msg = e.to_string();
            for ((key, event), reply) in items.into_iter().zip(replies) {
                let result = Err(LogError::Sql(msg.clone()));
                state.counter.count(&result);
                reply.send(key, event, result);
            }
        }
    }
}

/// What a checkpoint will sign, read atomically on the log's thread.
struct Head {
    index: u64,
    size: u64,
    root: Hash,
    min_timestamp_ms: i64,
    consistency: Vec<Hash>,
}

fn prepare_checkpoint(state: &mut State, only_if_new: bool) -> Result<Option<Head>, LogError> {
    let size = state.frontier.size();
    let prev = state.last_checkpoint.as_ref();
    if only_if_new && prev.map_or(size == 0, |p| p.size == size) {
        return Ok(None);
    }
    let consistency = match prev {
        Some(p) => merkle::consistency_proof(p.size, size, |a, b| subtree(&state.conn, a, b))?,
        None => Vec::new(),
    };
    Ok(Some(Head {
        index: prev.map_or(0, |p| p.index + 1),
        size,
        root: state.frontier.root(),
        min_timestamp_ms: prev.map_or(0, |p| p.timestamp_ms),
        consistency,
    }))
}

fn store_checkpoint(
    state: &mut State,
    cp: SignedCheckpoint,
    consistency: &[Hash],
) -> Result<(), LogError> {
    let proof: Vec<u8> = consistency.iter().flatten().copied().collect();
    // With appends committed unsynced, the checkpoint's commit is the one that fsyncs the WAL (and
    // with it every leaf the checkpoint covers).
    let full_for_this = !state.fsync_appends;
    if full_for_this {
        state.conn.pragma_update(None, "synchronous", "FULL")?;
    }
    let inserted = state.conn.execute(
        "INSERT INTO checkpoints (idx, size, root, timestamp_ms, key_id, algorithm, signature, consistency)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            cp.index as i64,
            cp.size as i64,
            &cp.root[..],
            cp.timestamp_ms,
            cp.key_id,
            cp.algorithm.as_str(),
            cp.signature,
            proof,
        ],
    );
    if full_for_this {
        state.conn.pragma_update(None, "synchronous", "NORMAL")?;
    }
    inserted?;
    state.since_checkpoint = state.frontier.size() - cp.size;
    state.last_checkpoint = Some(cp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::Ed25519Signer;
    use crate::audit::merkle::{root_of, verify_consistency, verify_inclusion};
    use crate::audit::{EventKind, merkle};

    fn event(task: &str) -> AuditEvent {
        AuditEvent::new(EventKind::Transition, "ns", task)
    }

    async fn open(dir: &Path, every: u64) -> Arc<AuditLog> {
        let mut cfg = AuditLogConfig::new(dir.join("audit.sqlite"), "test/audit");
        cfg.checkpoint_every = every;
        cfg.checkpoint_interval = Duration::from_secs(3600);
        AuditLog::open(cfg, Arc::new(Ed25519Signer::from_seed([3; 32])))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn appends_are_idempotent_by_key_and_roots_match_the_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1000).await;
        let mut hashes = Vec::new();
        for i in 0..37u64 {
            let a = log
                .append(format!("k{i}"), event(&format!("t{i}")))
                .await
                .unwrap();
            assert_eq!(a, Appended { seq: i, new: true });
            let leaf = log.leaf(i).await.unwrap().unwrap();
            assert_eq!(leaf.hash, merkle::leaf_hash(&leaf.data));
            assert_eq!(leaf.event().unwrap().seq, i);
            hashes.push(leaf.hash);
            assert_eq!(log.head().await.unwrap(), (i + 1, root_of(&hashes)));
        }
        // Replays return the first seq and add nothing.
        let again = log.append("k5", event("t5")).await.unwrap();
        assert_eq!(again, Appended { seq: 5, new: false });
        assert_eq!(log.size().await.unwrap(), 37);

        // Proofs from stored nodes match proofs from the leaf list.
        for size in [1u64, 2, 5, 16, 17, 37] {
            let root = log.root_at(size).await.unwrap();
            assert_eq!(root, root_of(&hashes[..size as usize]));
            for seq in (0..size).step_by(3) {
                let p = log.inclusion_proof(seq, size).await.unwrap();
                verify_inclusion(&hashes[seq as usize], seq, size, &p, &root).unwrap();
            }
            let p = log.consistency_proof(size, 37).await.unwrap();
            let (_, head) = log.head().await.unwrap();
            verify_consistency(size, 37, &root, &head, &p).unwrap();
        }
        assert!(matches!(
            log.inclusion_proof(0, 38).await,
            Err(LogError::NoSuchLeaf { .. })
        ));
    }

    #[tokio::test]
    async fn a_batch_window_keeps_queue_order_and_answers_every_caller() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = AuditLogConfig::new(dir.path().join("audit.sqlite"), "test/audit");
        cfg.checkpoint_interval = Duration::from_secs(3600);
        cfg.fsync_appends = false;
        cfg.batch_window = Duration::from_millis(20);
        let log = AuditLog::open(cfg, Arc::new(Ed25519Signer::from_seed([3; 32])))
            .await
            .unwrap();
        let failures = Arc::new(DetachedFailures::default());
        // Queued without waiting, in bursts separated by more than the window: each burst lands in
        // the order it was queued, with seqs following on from the one before.
        for burst in 0..3 {
            for i in 0..50 {
                log.enqueue_detached(
                    format!("k{burst}-{i}"),
                    event(&format!("t{burst}-{i}")),
                    &failures,
                )
                .await
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // A caller that does wait is answered too (within the window), after everything queued.
        let waited = log.append("last", event("last")).await.unwrap();
        assert_eq!(
            waited,
            Appended {
                seq: 150,
                new: true
            }
        );
        assert!(!failures.any());
        for (seq, task) in [(0, "t0-0"), (49, "t0-49"), (50, "t1-0"), (149, "t2-49")] {
            let leaf = log.leaf(seq).await.unwrap().unwrap();
            assert_eq!(leaf.event().unwrap().task, task, "leaf {seq}");
        }
        // The same keys again add nothing.
        log.enqueue_detached("k0-0", event("again"), &failures)
            .await
            .unwrap();
        assert_eq!(log.size().await.unwrap(), 151);
        let cp = log.checkpoint().await.unwrap();
        assert_eq!(cp.size, 151);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_appends_are_group_committed_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1000).await;
        let mut handles = Vec::new();
        for i in 0..200 {
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                log.append(format!("k{i}"), event("t")).await.unwrap().seq
            }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn checkpoints_are_signed_every_n_appends_and_chain_consistently() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 10).await;
        for i in 0..35 {
            log.append(format!("k{i}"), event("t")).await.unwrap();
        }
        // The every-10 trigger runs in the background: wait for it to catch up.
        let mut cps = Vec::new();
        for _ in 0..200 {
            cps = log.checkpoints().await.unwrap();
            if cps.last().is_some_and(|c| c.size >= 30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(cps.len() >= 3, "{cps:?}");
        let key = log.public_key().clone();
        for (i, cp) in cps.iter().enumerate() {
            assert_eq!(cp.index, i as u64);
            cp.verify(&key).unwrap();
            assert_eq!(cp.root, log.root_at(cp.size).await.unwrap());
        }
        // On demand: signs the tail; if-new then has nothing to do.
        let last = log.checkpoint().await.unwrap();
        assert_eq!(last.size, 35);
        assert_eq!(log.checkpoint_if_new().await.unwrap(), None);
        // A forced checkpoint over an unchanged head is allowed and keeps the timestamps monotonic.
        let again = log.checkpoint().await.unwrap();
        assert_eq!((again.size, again.root), (last.size, last.root));
        assert!(again.timestamp_ms >= last.timestamp_ms);
    }

    #[tokio::test]
    async fn reopening_continues_the_same_tree_and_refuses_another_origin() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let log = open(dir.path(), 1000).await;
            for i in 0..13 {
                log.append(format!("k{i}"), event("t")).await.unwrap();
            }
            let cp = log.checkpoint().await.unwrap();
            log.close().await.unwrap();
            cp
        };
        let log = open(dir.path(), 1000).await;
        assert_eq!(log.latest_checkpoint().await.unwrap(), Some(before.clone()));
        assert_eq!(log.size().await.unwrap(), 13);
        for i in 13..29 {
            let a = log.append(format!("k{i}"), event("t")).await.unwrap();
            assert_eq!(a.seq, i);
        }
        let after = log.checkpoint().await.unwrap();
        assert_eq!(after.index, before.index + 1);
        let proof = log
            .consistency_proof(before.size, after.size)
            .await
            .unwrap();
        verify_consistency(before.size, after.size, &before.root, &after.root, &proof).unwrap();
        log.close().await.unwrap();
        assert!(matches!(log.size().await, Err(LogError::Closed)));

        let cfg = AuditLogConfig::new(dir.path().join("audit.sqlite"), "other/origin");
        let err = AuditLog::open(cfg, Arc::new(Ed25519Signer::from_seed([3; 32])))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, LogError::OriginMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_log_whose_tree_was_edited_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path(), 1000).await;
            for i in 0..8 {
                log.append(format!("k{i}"), event("t")).await.unwrap();
            }
            log.checkpoint().await.unwrap();
            log.close().await.unwrap();
        }
        let conn = Connection::open(dir.path().join("audit.sqlite")).unwrap();
        conn.execute("UPDATE nodes SET hash = zeroblob(32) WHERE level = 3", [])
            .unwrap();
        drop(conn);
        let mut cfg = AuditLogConfig::new(dir.path().join("audit.sqlite"), "test/audit");
        cfg.checkpoint_interval = Duration::from_secs(3600);
        let err = AuditLog::open(cfg, Arc::new(Ed25519Signer::from_seed([3; 32])))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, LogError::Corrupt(_)), "{err}");
    }
}
