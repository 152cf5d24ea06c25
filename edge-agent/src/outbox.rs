//! The durable outbox: every accepted intent lives here, fsynced, until the gateway has it, and its result
//! lands beside it.
//!
//! SQLite in WAL mode with `synchronous=FULL`: a commit returns only after the WAL is on disk. One writer
//! thread owns the connection; concurrent captures that arrive while a commit is in flight are grouped
//! into the next transaction (group commit), so the fsync cost is shared without ever acknowledging an
//! intent before it is durable. Sequence numbers are allocated inside the same transaction as the insert,
//! so they are gap-free per outbox and can never repeat across restarts.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OptionalExtension as _, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Largest number of captures committed in one transaction.
const MAX_GROUP: usize = 512;
/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the outbox at {path} is damaged ({detail}). Nothing was changed. To keep running, start the agent once with `--reset-outbox`: the damaged file is moved aside (kept for inspection) and a fresh, empty outbox is created"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "the outbox is full: {limit} intents are waiting for the gateway. Nothing was accepted; already queued intents are safe. Reconnect the device or raise --max-outbox"
    )]
    Full { limit: u64 },
    #[error(
        "the disk holding the outbox is full: nothing was accepted; already queued intents are safe"
    )]
    DiskFull,
    #[error("outbox database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    #[error("outbox file error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Build(String),
    #[error("the outbox writer has stopped")]
    Closed,
}

impl OutboxError {
    fn from_sqlite(path: &Path, e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => OutboxError::DiskFull,
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => OutboxError::Corrupt {
                path: path.to_owned(),
                detail: e.to_string(),
            },
            _ => OutboxError::Sqlite(e),
        }
    }
}

/// Where an entry is in its trip to the gateway.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum EntryState {
    /// Signed and durable, not yet accepted by the gateway.
    Pending,
    /// Accepted by the gateway (202); the task's phase is tracked in `phase`.
    Sent,
    /// The task reached a terminal phase; its result is stored.
    Done,
    /// The gateway refused it for good (e.g. invalid payload); the reason is stored.
    Rejected,
    /// Kept on the device by local policy (a `private` intent): never sent.
    Held,
    /// Waiting for (or running on) the device's local model; never sent. Stays here until the local
    /// model's answer is recorded, so a crash mid-call runs it again.
    Local,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::Pending => "pending",
            EntryState::Sent => "sent",
            EntryState::Done => "done",
            EntryState::Rejected => "rejected",
            EntryState::Held => "held",
            EntryState::Local => "local",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "sent" => EntryState::Sent,
            "done" => EntryState::Done,
            "rejected" => EntryState::Rejected,
            "held" => EntryState::Held,
            "local" => EntryState::Local,
            _ => EntryState::Pending,
        }
    }
}

/// Where an intent runs: on the device's local model or sent to the gateway (the cloud).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RunsOn {
    Device,
    Cloud,
}

impl RunsOn {
    pub fn as_str(self) -> &'static str {
        match self {
            RunsOn::Device => "device",
            RunsOn::Cloud => "cloud",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "device" {
            RunsOn::Device
        } else {
            RunsOn::Cloud
        }
    }
}

/// What a capture hands the outbox once it knows its sequence number.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub task_id: String,
    pub envelope: String,
    pub traceparent: String,
    pub intent_type: String,
    pub prompt: String,
    pub privacy: String,
    pub created_at: String,
    pub state: EntryState,
    pub runs_on: RunsOn,
}

/// One stored intent and what is known about its task.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub seq: u64,
    pub task_id: String,
    #[serde(skip)]
    pub envelope: String,
    #[serde(skip)]
    pub traceparent: String,
    pub intent_type: String,
    pub prompt: String,
    pub privacy: String,
    pub created_at: String,
    pub state: EntryState,
    /// Where the intent runs (or ran); the UI shows it.
    pub runs_on: RunsOn,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub phase: Option<String>,
    pub result: Option<String>,
    pub reason: Option<String>,
    pub updated_at: String,
}

/// What the gateway reported about one sent task.
#[derive(Clone, Debug)]
pub struct TaskUpdate {
    pub task_id: String,
    pub phase: String,
    pub terminal: bool,
    pub result: Option<String>,
    pub reason: Option<String>,
}

/// Counts per state.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub pending: u64,
    pub sent: u64,
    pub done: u64,
    pub rejected: u64,
    pub held: u64,
    /// Waiting for or running on the local model.
    pub local: u64,
}

#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub path: PathBuf,
    /// Most intents not yet finished (pending, sent, held, local). Captures beyond it are refused, never dropped.
    pub max_unfinished: u64,
    /// Finished entries (done, rejected) kept for display; older ones are pruned by `prune`.
    pub keep_finished: u64,
    /// Raise the next sequence number to at least this on open (used after a reset, see `agent`).
    pub seq_floor: Option<u64>,
}

impl OutboxConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            path: path.into(),
            max_unfinished: 100_000,
            keep_finished: 10_000,
            seq_floor: None,
        }
    }
}

type BuildFn = Box<dyn FnOnce(u64) -> Result<NewEntry, OutboxError> + Send>;
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

enum Cmd {
    Insert {
        build: BuildFn,
        reply: oneshot::Sender<Result<(u64, String), OutboxError>>,
    },
    Job(Job),
}

/// Handle to the outbox; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
}

impl Outbox {
    /// Opens (or creates) the outbox, checking its integrity first. A damaged file is reported, never
    /// repaired or replaced silently.
    pub fn open(cfg: OutboxConfig) -> Result<Self, OutboxError> {
        let conn = open_connection(&cfg.path)?;
        if let Some(floor) = cfg.seq_floor {
            conn.execute(
                "UPDATE meta SET v = max(v, ?1) WHERE k = 'next_seq'",
                [i64::try_from(floor).unwrap_or(i64::MAX)],
            )
            .map_err(|e| OutboxError::from_sqlite(&cfg.path, e))?;
        }
        let (tx, rx) = mpsc::channel(1024);
        let path = cfg.path.clone();
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer_loop(conn, cfg, rx))
            .map_err(|source| OutboxError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Outbox { tx, path })
    }

    /// Moves a damaged outbox (and its WAL) aside to `<path>.corrupt-<unix secs>` so a fresh one can be
    /// created. Returns the new name of the main file. Called only on the operator's explicit request.
    pub fn move_aside(path: &Path) -> Result<PathBuf, OutboxError> {
        let stamp = jiff::Timestamp::now().as_second();
        let mut target_name = path.file_name().unwrap_or_default().to_os_string();
        target_name.push(format!(".corrupt-{stamp}"));
        let target = path.with_file_name(target_name);
        for suffix in ["", "-wal", "-shm"] {
            let mut from = path.as_os_str().to_owned();
            from.push(suffix);
            let mut to = target.as_os_str().to_owned();
            to.push(suffix);
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(OutboxError::Io {
                        path: PathBuf::from(from),
                        source,
                    });
                }
            }
        }
        Ok(target)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores one intent durably. `build` receives the allocated sequence number and returns the signed
    /// entry; it runs inside the transaction, so the number is used exactly once. Returns `(seq, task id)`
    /// only after the commit (and its fsync) succeeded.
    pub async fn insert(
        &self,
        build: impl FnOnce(u64) -> Result<NewEntry, OutboxError> + Send + 'static,
    ) -> Result<(u64, String), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Insert {
                build: Box::new(build),
                reply,
            })
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, OutboxError> + Send + 'static,
    ) -> Result<R, OutboxError> {
        let (reply, rx) = oneshot::channel();
        let path = self.path.clone();
        let job: Job = Box::new(move |conn| {
            let out = f(conn).map_err(|e| match e {
                OutboxError::Sqlite(e) => OutboxError::from_sqlite(&path, e),
                other => other,
            });
            let _ = reply.send(out);
        });
        self.tx
            .send(Cmd::Job(job))
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// The next sequence number that will be allocated.
    pub async fn next_seq(&self) -> Result<u64, OutboxError> {
        self.call(|c| read_next_seq(c).map_err(OutboxError::Sqlite))
            .await
    }

    /// Makes sure future sequence numbers are at least `floor` (e.g. above the gateway's `lastSeq` after
    /// an enrollment). Never lowers it.
    pub async fn raise_next_seq(&self, floor: u64) -> Result<u64, OutboxError> {
        self.call(move |c| {
            let tx = c.transaction().map_err(OutboxError::Sqlite)?;
            let cur = read_next_seq(&tx).map_err(OutboxError::Sqlite)?;
            let next = cur.max(floor);
            write_next_seq(&tx, next).map_err(OutboxError::Sqlite)?;
            tx.commit().map_err(OutboxError::Sqlite)?;
            Ok(next)
        })
        .await
    }

    /// Pending entries in sequence order, oldest first.
    pub async fn pending(&self, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        self.query(
            "SELECT * FROM outbox WHERE state = 'pending' ORDER BY seq LIMIT ?1",
            limit as i64,
        )
        .await
    }

    /// Pending entries above `seq`, in sequence order (the sender reads on from where it stopped).
    pub async fn pending_after(&self, seq: u64, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.call(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT * FROM outbox WHERE state = 'pending' AND seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(OutboxError::Sqlite)?;
            let rows = stmt
                .query_map(params![seq, limit as i64], row_to_entry)
                .map_err(OutboxError::Sqlite)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(OutboxError::Sqlite)
        })
        .await
    }

    /// Entries accepted by the gateway whose task has not finished, least recently polled first (so a
    /// task stuck awaiting approval never starves the others).
    pub async fn in_progress(&self, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        self.query(
            "SELECT * FROM outbox WHERE state = 'sent' ORDER BY polled_at, seq LIMIT ?1",
            limit as i64,
        )
        .await
    }

    /// The newest entries first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        self.query(
            "SELECT * FROM outbox ORDER BY seq DESC LIMIT ?1",
            limit as i64,
        )
        .await
    }

    /// Every entry in sequence order (for tests and `status --all`).
    pub async fn all(&self) -> Result<Vec<Entry>, OutboxError> {
        self.query("SELECT * FROM outbox WHERE ?1 ORDER BY seq", 1)
            .await
    }

    async fn query(&self, sql: &'static str, arg: i64) -> Result<Vec<Entry>, OutboxError> {
        self.call(move |c| {
            let mut stmt = c.prepare_cached(sql).map_err(OutboxError::Sqlite)?;
            let rows = stmt
                .query_map([arg], row_to_entry)
                .map_err(OutboxError::Sqlite)?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(OutboxError::Sqlite)
        })
        .await
    }

    pub async fn get(&self, task_id: &str) -> Result<Option<Entry>, OutboxError> {
        let task_id = task_id.to_owned();
        self.call(move |c| {
            c.query_row(
                "SELECT * FROM outbox WHERE task_id = ?1",
                [task_id],
                row_to_entry,
            )
            .optional()
            .map_err(OutboxError::Sqlite)
        })
        .await
    }

    pub async fn counts(&self) -> Result<Counts, OutboxError> {
        self.call(|c| {
            let mut stmt = c
                .prepare_cached("SELECT state, count(*) FROM outbox GROUP BY state")
                .map_err(OutboxError::Sqlite)?;
            let mut counts = Counts::default();
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(OutboxError::Sqlite)?;
            for row in rows {
                let (state, n) = row.map_err(OutboxError::Sqlite)?;
                let n = n.max(0) as u64;
                match EntryState::parse(&state) {
                    EntryState::Pending => counts.pending += n,
                    EntryState::Sent => counts.sent += n,
                    EntryState::Done => counts.done += n,
                    EntryState::Rejected => counts.rejected += n,
                    EntryState::Held => counts.held += n,
                    EntryState::Local => counts.local += n,
                }
            }
            Ok(counts)
        })
        .await
    }

    /// The gateway accepted the entry (202, new or duplicate).
    pub async fn mark_sent(&self, task_id: &str, phase: &str) -> Result<(), OutboxError> {
        self.update(
            "UPDATE outbox SET state = 'sent', phase = ?2, last_error = NULL, attempts = attempts + 1, updated_at = ?3 WHERE task_id = ?1 AND state = 'pending'",
            task_id,
            Some(phase.to_owned()),
        )
        .await
    }

    /// Several acceptances in one transaction (one fsync), in the order given.
    pub async fn mark_sent_many(&self, accepted: Vec<(String, String)>) -> Result<(), OutboxError> {
        if accepted.is_empty() {
            return Ok(());
        }
        self.call(move |c| {
            let tx = c.transaction().map_err(OutboxError::Sqlite)?;
            {
                let mut stmt = tx
                    .prepare_cached("UPDATE outbox SET state = 'sent', phase = ?2, last_error = NULL, attempts = attempts + 1, updated_at = ?3 WHERE task_id = ?1 AND state = 'pending'")
                    .map_err(OutboxError::Sqlite)?;
                let at = now();
                for (task_id, phase) in &accepted {
                    stmt.execute(params![task_id, phase, at])
                        .map_err(OutboxError::Sqlite)?;
                }
            }
            tx.commit().map_err(OutboxError::Sqlite)
        })
        .await
    }

    /// A send failed in a way worth retrying; the entry stays pending.
    pub async fn mark_attempt_failed(&self, task_id: &str, error: &str) -> Result<(), OutboxError> {
        self.update(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, updated_at = ?3 WHERE task_id = ?1 AND state = 'pending'",
            task_id,
            Some(truncate(error, 1000)),
        )
        .await
    }

    /// The gateway refused the entry for good; it is kept with the reason, never deleted.
    pub async fn mark_rejected(&self, task_id: &str, reason: &str) -> Result<(), OutboxError> {
        self.update(
            "UPDATE outbox SET state = 'rejected', attempts = attempts + 1, reason = ?2, updated_at = ?3 WHERE task_id = ?1 AND state = 'pending'",
            task_id,
            Some(truncate(reason, 4000)),
        )
        .await
    }

    /// Local policy keeps the entry on the device.
    pub async fn mark_held(&self, task_id: &str, reason: &str) -> Result<(), OutboxError> {
        self.update(
            "UPDATE outbox SET state = 'held', reason = ?2, updated_at = ?3 WHERE task_id = ?1 AND state = 'pending'",
            task_id,
            Some(truncate(reason, 4000)),
        )
        .await
    }

    /// Stores what the gateway reports about a sent task; a terminal phase finishes the entry.
    pub async fn record_task(
        &self,
        task_id: &str,
        phase: &str,
        terminal: bool,
        result: Option<String>,
        reason: Option<String>,
    ) -> Result<(), OutboxError> {
        self.record_tasks(vec![TaskUpdate {
            task_id: task_id.to_owned(),
            phase: phase.to_owned(),
            terminal,
            result,
            reason,
        }])
        .await
    }

    /// Several task updates in one transaction (one fsync).
    pub async fn record_tasks(&self, updates: Vec<TaskUpdate>) -> Result<(), OutboxError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.call(move |c| {
            let tx = c.transaction().map_err(OutboxError::Sqlite)?;
            {
                let mut stmt = tx
                    .prepare_cached("UPDATE outbox SET state = ?2, phase = ?3, result = ?4, reason = ?5, updated_at = ?6, polled_at = ?7 WHERE task_id = ?1 AND state = 'sent'")
                    .map_err(OutboxError::Sqlite)?;
                let (at, at_ms) = (now(), now_millis());
                for u in updates {
                    let state = if u.terminal { "done" } else { "sent" };
                    stmt.execute(params![
                        u.task_id,
                        state,
                        u.phase,
                        u.result.map(|r| truncate(&r, 1 << 20)),
                        u.reason.map(|r| truncate(&r, 4000)),
                        at,
                        at_ms
                    ])
                    .map_err(OutboxError::Sqlite)?;
                }
            }
            tx.commit().map_err(OutboxError::Sqlite)
        })
        .await
    }

    /// Entries waiting for the local model, oldest first.
    pub async fn local_queue(&self, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        self.query(
            "SELECT * FROM outbox WHERE state = 'local' ORDER BY seq LIMIT ?1",
            limit as i64,
        )
        .await
    }

    /// The local model's outcome for an entry: it is done, with the answer or the reason it failed.
    pub async fn record_local(
        &self,
        task_id: &str,
        phase: &str,
        result: Option<String>,
        reason: Option<String>,
    ) -> Result<(), OutboxError> {
        let task_id = task_id.to_owned();
        let phase = phase.to_owned();
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET state = 'done', phase = ?2, result = ?3, reason = ?4, attempts = attempts + 1, last_error = NULL, updated_at = ?5 WHERE task_id = ?1 AND state = 'local'",
                params![
                    task_id,
                    phase,
                    result.map(|r| truncate(&r, 1 << 20)),
                    reason.map(|r| truncate(&r, 4000)),
                    now()
                ],
            )
            .map_err(OutboxError::Sqlite)?;
            Ok(())
        })
        .await
    }

    /// A local model call failed in a way worth retrying; the entry stays queued for it.
    pub async fn mark_local_attempt_failed(
        &self,
        task_id: &str,
        error: &str,
    ) -> Result<(), OutboxError> {
        self.update(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, updated_at = ?3 WHERE task_id = ?1 AND state = 'local'",
            task_id,
            Some(truncate(error, 1000)),
        )
        .await
    }

    /// A status poll for the task failed; it goes to the back of the polling line.
    pub async fn touch_polled(&self, task_id: &str) -> Result<(), OutboxError> {
        let task_id = task_id.to_owned();
        self.call(move |c| {
            c.execute(
                "UPDATE outbox SET polled_at = ?2 WHERE task_id = ?1",
                params![task_id, now_millis()],
            )
            .map_err(OutboxError::Sqlite)?;
            Ok(())
        })
        .await
    }

    /// Removes the oldest finished entries beyond `keep_finished`. Unfinished entries are never removed.
    pub async fn prune(&self, keep_finished: u64) -> Result<usize, OutboxError> {
        self.call(move |c| {
            c.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE state IN ('done','rejected') ORDER BY seq DESC LIMIT -1 OFFSET ?1)",
                [keep_finished as i64],
            )
            .map_err(OutboxError::Sqlite)
        })
        .await
    }

    async fn update(
        &self,
        sql: &'static str,
        task_id: &str,
        arg: Option<String>,
    ) -> Result<(), OutboxError> {
        let task_id = task_id.to_owned();
        self.call(move |c| {
            c.execute(sql, params![task_id, arg, now()])
                .map_err(OutboxError::Sqlite)?;
            Ok(())
        })
        .await
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn now_millis() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

fn open_connection(path: &Path) -> Result<Connection, OutboxError> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::identity::create_private_dir(dir).map_err(|source| OutboxError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    let sq = |e| OutboxError::from_sqlite(path, e);
    let conn = Connection::open(path).map_err(sq)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sq)?;
    // Reading the header happens on the first statement: a file that is not a database fails here.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sq)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OutboxError::Build(format!(
            "the outbox at {} cannot use WAL mode (got {mode}); is it on a network file system?",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sq)?;
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(sq)?;
    if check != "ok" {
        return Err(OutboxError::Corrupt {
            path: path.to_owned(),
            detail: check,
        });
    }
    migrate(&conn).map_err(sq)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    if version < 1 {
        create_v1(conn)?;
    }
    // v2: where each intent runs. Every entry older than the local model tier went to the gateway.
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE outbox ADD COLUMN runs_on TEXT NOT NULL DEFAULT 'cloud';
         PRAGMA user_version = 2;
         COMMIT;",
    )
}

fn create_v1(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
         INSERT OR IGNORE INTO meta (k, v) VALUES ('next_seq', 1);
         CREATE TABLE IF NOT EXISTS outbox (
             seq INTEGER PRIMARY KEY,
             task_id TEXT NOT NULL UNIQUE,
             envelope TEXT NOT NULL,
             traceparent TEXT NOT NULL,
             intent_type TEXT NOT NULL,
             prompt TEXT NOT NULL,
             privacy TEXT NOT NULL,
             created_at TEXT NOT NULL,
             state TEXT NOT NULL,
             attempts INTEGER NOT NULL DEFAULT 0,
             last_error TEXT,
             phase TEXT,
             result TEXT,
             reason TEXT,
             updated_at TEXT NOT NULL,
             polled_at INTEGER NOT NULL DEFAULT 0
         );
         CREATE INDEX IF NOT EXISTS outbox_state_seq ON outbox (state, seq);
         PRAGMA user_version = 1;
         COMMIT;",
    )
}

fn read_next_seq(c: &Connection) -> rusqlite::Result<u64> {
    let v: i64 = c.query_row("SELECT v FROM meta WHERE k = 'next_seq'", [], |r| r.get(0))?;
    Ok(v.max(1) as u64)
}

fn write_next_seq(c: &Connection, next: u64) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE meta SET v = ?1 WHERE k = 'next_seq'",
        [i64::try_from(next).unwrap_or(i64::MAX)],
    )?;
    Ok(())
}

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        seq: r.get::<_, i64>("seq")?.max(0) as u64,
        task_id: r.get("task_id")?,
        envelope: r.get("envelope")?,
        traceparent: r.get("traceparent")?,
        intent_type: r.get("intent_type")?,
        prompt: r.get("prompt")?,
        privacy: r.get("privacy")?,
        created_at: r.get("created_at")?,
        state: EntryState::parse(&r.get::<_, String>("state")?),
        runs_on: RunsOn::parse(&r.get::<_, String>("runs_on")?),
        attempts: r.get::<_, i64>("attempts")?.clamp(0, u32::MAX as i64) as u32,
        last_error: r.get("last_error")?,
        phase: r.get("phase")?,
        result: r.get("result")?,
        reason: r.get("reason")?,
        updated_at: r.get("updated_at")?,
    })
}

fn writer_loop(mut conn: Connection, cfg: OutboxConfig, mut rx: mpsc::Receiver<Cmd>) {
    let mut deferred: Option<Cmd> = None;
    loop {
        let first = match deferred.take() {
            Some(cmd) => cmd,
            None => match rx.blocking_recv() {
                Some(cmd) => cmd,
                None => return,
            },
        };
        match first {
            Cmd::Job(job) => job(&mut conn),
            Cmd::Insert { build, reply } => {
                // Group commit: take every capture already waiting, up to MAX_GROUP.
                let mut group = vec![(build, reply)];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Cmd::Insert { build, reply }) => group.push((build, reply)),
                        Ok(other) => {
                            deferred = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut conn, &cfg, group);
            }
        }
    }
}

type Inserted = Result<(u64, String), OutboxError>;
type Reply = oneshot::Sender<Inserted>;

fn commit_group(conn: &mut Connection, cfg: &OutboxConfig, group: Vec<(BuildFn, Reply)>) {
    let path = cfg.path.as_path();
    let sq = |e| OutboxError::from_sqlite(path, e);
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let err = sq(e);
            for (_, reply) in group {
                let _ = reply.send(Err(clone_err(&err)));
            }
            return;
        }
    };
    let prepared = (|| -> Result<(u64, u64), OutboxError> {
        let next = read_next_seq(&tx).map_err(sq)?;
        let unfinished: i64 = tx
            .query_row(
                "SELECT count(*) FROM outbox WHERE state IN ('pending','sent','held','local')",
                [],
                |r| r.get(0),
            )
            .map_err(sq)?;
        Ok((next, unfinished.max(0) as u64))
    })();
    let (mut next, mut unfinished) = match prepared {
        Ok(v) => v,
        Err(err) => {
            for (_, reply) in group {
                let _ = reply.send(Err(clone_err(&err)));
            }
            return;
        }
    };
    let mut outcomes: Vec<(Reply, Inserted)> = Vec::new();
    for (build, reply) in group {
        if unfinished >= cfg.max_unfinished {
            outcomes.push((
                reply,
                Err(OutboxError::Full {
                    limit: cfg.max_unfinished,
                }),
            ));
            continue;
        }
        let seq = next;
        let outcome = build(seq).and_then(|e| {
            tx.execute(
                "INSERT INTO outbox (seq, task_id, envelope, traceparent, intent_type, prompt, privacy, created_at, state, updated_at, runs_on)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    i64::try_from(seq).unwrap_or(i64::MAX),
                    e.task_id,
                    e.envelope,
                    e.traceparent,
                    e.intent_type,
                    e.prompt,
                    e.privacy,
                    e.created_at,
                    e.state.as_str(),
                    now(),
                    e.runs_on.as_str()
                ],
            )
            .map_err(sq)?;
            Ok((seq, e.task_id))
        });
        if outcome.is_ok() {
            next += 1;
            unfinished += 1;
        }
        outcomes.push((reply, outcome));
    }
    let committed = write_next_seq(&tx, next)
        .and_then(|()| tx.commit())
        .map_err(sq);
    match committed {
        Ok(()) => {
            for (reply, outcome) in outcomes {
                let _ = reply.send(outcome);
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "outbox commit failed; no capture in the group was accepted");
            for (reply, outcome) in outcomes {
                let _ = reply.send(match outcome {
                    Ok(_) => Err(clone_err(&err)),
                    Err(e) => Err(e),
                });
            }
        }
    }
}

/// `rusqlite::Error` is not `Clone`; a group's shared failure is reported to each member as text.
fn clone_err(e: &OutboxError) -> OutboxError {
    match e {
        OutboxError::Corrupt { path, detail } => OutboxError::Corrupt {
            path: path.clone(),
            detail: detail.clone(),
        },
        OutboxError::Full { limit } => OutboxError::Full { limit: *limit },
        OutboxError::DiskFull => OutboxError::DiskFull,
        OutboxError::Closed => OutboxError::Closed,
        other => OutboxError::Build(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(task_id: String) -> NewEntry {
        NewEntry {
            task_id,
            envelope: "{}".into(),
            traceparent: "00-0-0-01".into(),
            intent_type: "t".into(),
            prompt: "p".into(),
            privacy: "public".into(),
            created_at: now(),
            state: EntryState::Pending,
            runs_on: RunsOn::Cloud,
        }
    }

    async fn add(o: &Outbox, id: &str) -> Result<(u64, String), OutboxError> {
        let id = id.to_owned();
        o.insert(move |_| Ok(entry(id))).await
    }

    #[tokio::test]
    async fn a_version_1_outbox_is_migrated_and_its_entries_ran_in_the_cloud() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        {
            let conn = Connection::open(&path).unwrap();
            create_v1(&conn).unwrap();
            conn.execute(
                "INSERT INTO outbox (seq, task_id, envelope, traceparent, intent_type, prompt, privacy, created_at, state, updated_at)
                 VALUES (1, 'old', '{}', 'tp', 't', 'p', 'public', 'c', 'done', 'u')",
                [],
            )
            .unwrap();
        }
        let o = Outbox::open(OutboxConfig::new(&path)).unwrap();
        let e = o.get("old").await.unwrap().unwrap();
        assert_eq!((e.state, e.runs_on), (EntryState::Done, RunsOn::Cloud));
        drop(o);
        // Opening again finds version 2 and changes nothing.
        let o = Outbox::open(OutboxConfig::new(&path)).unwrap();
        assert_eq!(o.all().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn seq_is_monotonic_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let o = Outbox::open(OutboxConfig::new(&path)).unwrap();
            assert_eq!(add(&o, "a").await.unwrap().0, 1);
            assert_eq!(add(&o, "b").await.unwrap().0, 2);
        }
        let o = Outbox::open(OutboxConfig::new(&path)).unwrap();
        assert_eq!(add(&o, "c").await.unwrap().0, 3);
        assert_eq!(o.raise_next_seq(10).await.unwrap(), 10);
        assert_eq!(o.raise_next_seq(5).await.unwrap(), 10, "never lowered");
        assert_eq!(add(&o, "d").await.unwrap().0, 10);
    }

    #[tokio::test]
    async fn a_failed_build_consumes_no_seq() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).unwrap();
        let err = o
            .insert(|_| Err(OutboxError::Build("nope".into())))
            .await
            .unwrap_err();
        assert!(matches!(err, OutboxError::Build(_)));
        assert_eq!(add(&o, "a").await.unwrap().0, 1);
        // A duplicate task id fails alone and does not consume a number either.
        assert!(add(&o, "a").await.is_err());
        assert_eq!(add(&o, "b").await.unwrap().0, 2);
    }

    #[tokio::test]
    async fn concurrent_captures_get_distinct_gap_free_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).unwrap();
        let mut handles = Vec::new();
        for i in 0..200 {
            let o = o.clone();
            handles.push(tokio::spawn(async move { add(&o, &format!("t{i}")).await }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap().unwrap().0);
        }
        seqs.sort();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn full_outbox_refuses_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = OutboxConfig::new(dir.path().join("o.db"));
        cfg.max_unfinished = 3;
        let o = Outbox::open(cfg).unwrap();
        for id in ["a", "b", "c"] {
            add(&o, id).await.unwrap();
        }
        let err = add(&o, "d").await.unwrap_err();
        assert!(matches!(err, OutboxError::Full { limit: 3 }), "{err}");
        assert!(err.to_string().contains("full"));
        assert_eq!(o.counts().await.unwrap().pending, 3);
        // Once one is finished there is room again.
        o.mark_sent("a", "Pending").await.unwrap();
        o.record_task("a", "Succeeded", true, Some("ok".into()), None)
            .await
            .unwrap();
        assert_eq!(add(&o, "d").await.unwrap().0, 4);
    }

    #[tokio::test]
    async fn pending_after_reads_on_from_a_seq() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).unwrap();
        for id in ["a", "b", "c", "d"] {
            add(&o, id).await.unwrap();
        }
        o.mark_sent("c", "Pending").await.unwrap();
        let seqs = |v: Vec<Entry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(o.pending_after(0, 2).await.unwrap()), vec![1, 2]);
        assert_eq!(seqs(o.pending_after(2, 10).await.unwrap()), vec![4]);
        assert!(o.pending_after(4, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn lifecycle_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).unwrap();
        for id in ["a", "b", "c"] {
            add(&o, id).await.unwrap();
        }
        assert_eq!(
            o.pending(10)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        o.mark_attempt_failed("a", "offline").await.unwrap();
        let a = o.get("a").await.unwrap().unwrap();
        assert_eq!((a.attempts, a.last_error.as_deref()), (1, Some("offline")));
        o.mark_sent("a", "Pending").await.unwrap();
        o.mark_rejected("b", "invalid_payload").await.unwrap();
        assert_eq!(o.in_progress(10).await.unwrap().len(), 1);
        o.record_task("a", "Running", false, None, None)
            .await
            .unwrap();
        assert_eq!(
            o.get("a").await.unwrap().unwrap().phase.as_deref(),
            Some("Running")
        );
        o.record_task("a", "Succeeded", true, Some("42".into()), None)
            .await
            .unwrap();
        let a = o.get("a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.result.as_deref()),
            (EntryState::Done, Some("42"))
        );
        // A terminal entry never changes again.
        o.record_task("a", "Running", false, None, None)
            .await
            .unwrap();
        assert_eq!(o.get("a").await.unwrap().unwrap().state, EntryState::Done);
        assert_eq!(
            o.counts().await.unwrap(),
            Counts {
                pending: 1,
                sent: 0,
                done: 1,
                rejected: 1,
                held: 0,
                local: 0
            }
        );
        assert_eq!(o.prune(1).await.unwrap(), 1);
        assert!(
            o.get("a").await.unwrap().is_none(),
            "oldest finished pruned"
        );
        assert!(o.get("c").await.unwrap().is_some(), "pending never pruned");
    }

    #[tokio::test]
    async fn full_disk_is_reported_and_loses_nothing_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).unwrap();
        // SQLite reports SQLITE_FULL when the database cannot grow: the same error as a full disk.
        let pages: i64 = o
            .call(|c| {
                c.query_row("PRAGMA page_count", [], |r| r.get(0))
                    .map_err(OutboxError::Sqlite)
            })
            .await
            .unwrap();
        o.call(move |c| {
            c.query_row(
                &format!("PRAGMA max_page_count = {}", pages + 8),
                [],
                |_| Ok(()),
            )
            .map_err(OutboxError::Sqlite)
        })
        .await
        .unwrap();
        let mut accepted = Vec::new();
        let err = loop {
            let id = format!("t{}", accepted.len());
            let r = o
                .insert(move |_| {
                    let mut e = entry(id);
                    e.prompt = "x".repeat(3000);
                    Ok(e)
                })
                .await;
            match r {
                Ok((_, id)) => accepted.push(id),
                Err(e) => break e,
            }
            assert!(accepted.len() < 1000, "never filled up");
        };
        assert!(matches!(err, OutboxError::DiskFull), "{err}");
        assert!(err.to_string().contains("already queued intents are safe"));
        assert!(!accepted.is_empty());
        let all = o.all().await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.task_id.clone()).collect::<Vec<_>>(),
            accepted
        );
        // Delivery bookkeeping still works on a full disk (updates do not grow the file much), and the
        // next sequence number did not move.
        assert_eq!(o.next_seq().await.unwrap(), accepted.len() as u64 + 1);
    }

    #[tokio::test]
    async fn garbage_file_is_reported_as_corrupt_and_can_be_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Outbox::open(OutboxConfig::new(&path)).err().unwrap();
        assert!(matches!(err, OutboxError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("--reset-outbox"));
        let aside = Outbox::move_aside(&path).unwrap();
        assert!(aside.exists());
        let o = Outbox::open(OutboxConfig::new(&path)).unwrap();
        assert_eq!(add(&o, "a").await.unwrap().0, 1);
    }

    #[tokio::test]
    async fn truncated_file_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        {
            let o = Outbox::open(OutboxConfig::new(&path)).unwrap();
            for i in 0..300 {
                let id = format!("t{i}");
                o.insert(move |_| {
                    let mut e = entry(id);
                    e.prompt = "x".repeat(2000);
                    Ok(e)
                })
                .await
                .unwrap();
            }
        }
        // Fold the WAL into the main file, then cut the file in half.
        {
            let c = Connection::open(&path).unwrap();
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        let err = Outbox::open(OutboxConfig::new(&path)).err().unwrap();
        assert!(matches!(err, OutboxError::Corrupt { .. }), "{err}");
    }
}
