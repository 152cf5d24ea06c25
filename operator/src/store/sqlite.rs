//! The embedded store: one SQLite database in WAL mode holding tasks, devices, the policy, join tokens
//! and the queue tables (see `queue::sqlite`).
//!
//! All access goes through one connection owned by a dedicated OS thread, fed by a bounded channel of
//! jobs: SQLite allows one writer at a time anyway, a single owner needs no busy-retry logic, and the
//! tokio worker threads never block on disk.

use std::path::Path;
use std::sync::{Arc, RwLock};

use agentplane_api::TaskPhase;
use agentplane_api::device::{EdgeDeviceSpec, EdgeDeviceStatus};
use agentplane_api::policy::{AgentPolicySpec, AgentPolicyStatus, BreakerTrip};
use agentplane_api::task::{AgentTaskStatus, Approval};
use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::seq_window::SeqWindow;
use super::{
    Admission, DecisionRecord, DeviceRecord, EnrollOutcome, Enrollment, NewTask, StoreError,
    TaskChanged, TaskRecord, TaskStore, Version,
};

/// Jobs waiting for the database thread; senders wait (backpressure) when it is full.
const JOB_QUEUE_DEPTH: usize = 1024;

/// Name of the single policy object of the namespace.
pub const POLICY_NAME: &str = "default";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    phase TEXT NOT NULL,
    created_at TEXT NOT NULL,
    version INTEGER NOT NULL
);
-- The replay guard's second line: one task per (device, seq), whatever lastSeq says.
CREATE UNIQUE INDEX IF NOT EXISTS tasks_device_seq ON tasks(device, seq);
CREATE INDEX IF NOT EXISTS tasks_phase ON tasks(phase);
-- Approvers' decisions, kept apart from the task's status (the controller copies the one it accepts).
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    approval TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_task ON approvals(task_id, id);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    version INTEGER NOT NULL
);
-- The policy's status (the circuit breaker's lastTrip), beside its spec: a table of its own so that
-- databases made before it need no column migration.
CREATE TABLE IF NOT EXISTS policy_status (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS join_tokens (
    hash TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    attributes TEXT NOT NULL,
    group_id TEXT,
    dedup_id TEXT,
    visible_at INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    sent_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_visible ON messages(queue, visible_at);
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages(queue, dedup_id) WHERE dedup_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS messages_receipt ON messages(receipt) WHERE receipt IS NOT NULL;
";

/// The database thread is gone (it only stops when every handle is dropped, or on a panic in SQLite).
#[derive(Debug, thiserror::Error)]
#[error("the database thread has stopped")]
pub struct DbClosed;

impl From<DbClosed> for StoreError {
    fn from(e: DbClosed) -> Self {
        StoreError::backend(e)
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the database thread. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    jobs: mpsc::Sender<Job>,
}

impl Db {
    /// Opens (creating if needed) `path`, switches it to WAL and applies the schema.
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        let mut conn = Connection::open(path).map_err(StoreError::backend)?;
        // WAL: readers never block the writer; NORMAL sync is durable across process crashes (only
        // an OS crash can lose the last commits), which is the embedded mode's promise.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(StoreError::backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(StoreError::backend)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(StoreError::backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(StoreError::backend)?;
        {
            let tx = conn.transaction().map_err(StoreError::backend)?;
            tx.execute_batch(SCHEMA).map_err(StoreError::backend)?;
            tx.commit().map_err(StoreError::backend)?;
        }
        let (jobs, mut rx) = mpsc::channel::<Job>(JOB_QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("agentplane-sqlite".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut conn);
                }
            })
            .map_err(StoreError::backend)?;
        Ok(Db { jobs })
    }

    /// Runs `f` on the database thread and returns its result.
    pub async fn call<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbClosed> + Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone away (request cancelled); the result is then dropped.
            let _ = tx.send(f(conn));
        });
        self.jobs.send(job).await.map_err(|_| DbClosed)?;
        rx.await.map_err(|_| DbClosed)?
    }
}

/// The namespace's policy spec as stored.
fn read_policy(conn: &Connection) -> Result<Option<AgentPolicySpec>, StoreError> {
    let spec: Option<String> = conn
        .query_row(
            "SELECT spec FROM policies WHERE name = ?1",
            params![POLICY_NAME],
            |r| r.get(0),
        )
        .optional()
        .map_err(be)?;
    spec.map(|s| from_json(&s)).transpose()
}

/// The embedded [`TaskStore`].
pub struct SqliteStore {
    db: Db,
    namespace: String,
    changes: broadcast::Sender<TaskChanged>,
    /// The policy as last read or written on the database thread (`None` = not loaded yet). The
    /// runtime holds the data directory's lock, so no other process writes it behind our back; it is
    /// read for every task by the controller and the worker.
    policy: PolicyCache,
}

type PolicyCache = Arc<RwLock<Option<Option<AgentPolicySpec>>>>;

impl SqliteStore {
    pub fn new(db: Db, namespace: impl Into<String>) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        Arc::new(SqliteStore {
            db,
            namespace: namespace.into(),
            changes,
            policy: Arc::new(RwLock::new(None)),
        })
    }

    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.db.call(f).await
    }
}

/// Publishes a committed change. Called on the database thread right after the commit, so events
/// leave in commit order.
fn publish(changes: &broadcast::Sender<TaskChanged>, task: &TaskRecord) {
    // No receivers is fine: nobody is watching.
    let _ = changes.send(TaskChanged {
        id: task.id.clone(),
        phase: task.phase(),
        cancel_requested: task.spec.cancel_requested(),
        task: Arc::new(task.clone()),
    });
}

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::backend(e)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(be)
}

/// The policy's recorded status (empty when nothing was recorded yet).
fn read_policy_status(conn: &Connection) -> Result<AgentPolicyStatus, StoreError> {
    let status: Option<String> = conn
        .query_row(
            "SELECT status FROM policy_status WHERE name = ?1",
            params![POLICY_NAME],
            |r| r.get(0),
        )
        .optional()
        .map_err(be)?;
    Ok(status
        .map(|s| from_json(&s))
        .transpose()?
        .unwrap_or_default())
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(be)
}

const TASK_COLUMNS: &str = "id, spec, status, created_at, version";

fn read_task(conn: &Connection, id: &str) -> Result<Option<TaskRecord>, StoreError> {
    let row = conn
        .query_row(
            &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"),
            params![id],
            task_row,
        )
        .optional()
        .map_err(be)?;
    row.map(decode_task).transpose()
}

type TaskRow = (String, String, String, String, i64);

fn task_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn decode_task((id, spec, status, created_at, version): TaskRow) -> Result<TaskRecord, StoreError> {
    Ok(TaskRecord {
        id,
        spec: from_json(&spec)?,
        status: from_json(&status)?,
        created_at: created_at.parse().map_err(be)?,
        version: Version(version.to_string()),
    })
}

fn read_device(conn: &Connection, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
    let row = conn
        .query_row(
            "SELECT spec, status, version FROM devices WHERE name = ?1",
            params![name],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .optional()
        .map_err(be)?;
    row.map(|(spec, status, version)| {
        Ok(DeviceRecord {
            name: name.to_owned(),
            spec: from_json(&spec)?,
            status: from_json(&status)?,
            version: Version(version.to_string()),
        })
    })
    .transpose()
}

fn parse_version(kind: &'static str, id: &str, v: &Version) -> Result<i64, StoreError> {
    v.0.parse().map_err(|_| StoreError::Conflict {
        kind,
        id: id.to_owned(),
        expected: v.0.clone(),
    })
}

#[async_trait]
impl TaskStore for SqliteStore {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn admit(&self, task: NewTask) -> Result<Admission, StoreError> {
        let changes = self.changes.clone();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            if let Some(existing) = read_task(&tx, &task.id)? {
                return Ok(Admission::Existing(existing));
            }
            let device_name = task.spec.device_ref.name.clone();
            let device = read_device(&tx, &device_name)?.ok_or(StoreError::NotFound {
                kind: "EdgeDevice",
                id: device_name.clone(),
            })?;
            // The window answers "is this seq taken" for tasks deleted since too; the unique index
            // on (device, seq) stays as the second line.
            let window = match SeqWindow::of(&device.status).admit(task.seq) {
                Ok(w) => w,
                Err(refusal) => return Ok(Admission::SeqReplay(refusal)),
            };
            let now = Timestamp::now();
            let status = AgentTaskStatus {
                phase: Some(TaskPhase::Pending),
                trace_id: task.trace_id.clone(),
                ..Default::default()
            };
            tx.execute(
                "INSERT INTO tasks (id, device, seq, spec, status, phase, created_at, version)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1)",
                params![
                    task.id,
                    device_name,
                    task.seq as i64,
                    to_json(&task.spec)?,
                    to_json(&status)?,
                    TaskPhase::Pending.as_str(),
                    now.to_string(),
                ],
            )
            .map_err(be)?;
            let mut device_status = EdgeDeviceStatus {
                last_seen: Some(Time(now)),
                ..device.status
            };
            window.store_in(&mut device_status);
            tx.execute(
                "UPDATE devices SET status = ?1, version = version + 1 WHERE name = ?2",
                params![to_json(&device_status)?, device_name],
            )
            .map_err(be)?;
            let created = TaskRecord {
                id: task.id.clone(),
                spec: task.spec.clone(),
                status,
                created_at: now,
                version: Version("1".into()),
            };
            tx.commit().map_err(be)?;
            publish(&changes, &created);
            Ok(Admission::Created(created))
        })
        .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let id = id.to_owned();
        self.call(move |conn| read_task(conn, &id)).await
    }

    async fn list_unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.call(|conn| {
            let terminal: Vec<String> = TaskPhase::TERMINAL
                .iter()
                .map(|p| format!("'{}'", p.as_str()))
                .collect();
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks WHERE phase NOT IN ({}) ORDER BY created_at",
                    terminal.join(",")
                ))
                .map_err(be)?;
            let rows = stmt
                .query_map([], task_row)
                .map_err(be)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(be)?;
            rows.into_iter().map(decode_task).collect()
        })
        .await
    }

    async fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {TASK_COLUMNS} FROM tasks ORDER BY created_at"
                ))
                .map_err(be)?;
            let rows = stmt
                .query_map([], task_row)
                .map_err(be)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(be)?;
            rows.into_iter().map(decode_task).collect()
        })
        .await
    }

    async fn update_task_status(
        &self,
        id: &str,
        expected: &Version,
        status: AgentTaskStatus,
    ) -> Result<TaskRecord, StoreError> {
        let id = id.to_owned();
        let expected_n = parse_version("AgentTask", &id, expected)?;
        let changes = self.changes.clone();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            let current = read_task(&tx, &id)?.ok_or_else(|| StoreError::NotFound {
                kind: "AgentTask",
                id: id.clone(),
            })?;
            if current.version.0 != expected_n.to_string() {
                return Err(StoreError::Conflict {
                    kind: "AgentTask",
                    id,
                    expected: expected_n.to_string(),
                });
            }
            let (from, to) = (current.phase(), status.phase());
            if !from.can_move_to(to) {
                return Err(StoreError::IllegalTransition { id, from, to });
            }
            tx.execute(
                "UPDATE tasks SET status = ?1, phase = ?2, version = ?3 WHERE id = ?4",
                params![to_json(&status)?, to.as_str(), expected_n + 1, id],
            )
            .map_err(be)?;
            // What was just written, without reading it back.
            let updated = TaskRecord {
                status,
                version: Version((expected_n + 1).to_string()),
                ..current
            };
            tx.commit().map_err(be)?;
            publish(&changes, &updated);
            Ok(updated)
        })
        .await
    }

    async fn request_cancel(&self, id: &str) -> Result<TaskRecord, StoreError> {
        let id = id.to_owned();
        let changes = self.changes.clone();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            let mut current = read_task(&tx, &id)?.ok_or_else(|| StoreError::NotFound {
                kind: "AgentTask",
                id: id.clone(),
            })?;
            if current.spec.cancel_requested() {
                return Ok(current);
            }
            current.spec.cancel = Some(true);
            tx.execute(
                "UPDATE tasks SET spec = ?1, version = version + 1 WHERE id = ?2",
                params![to_json(&current.spec)?, id],
            )
            .map_err(be)?;
            let updated = read_task(&tx, &id)?.ok_or_else(|| be("task vanished"))?;
            tx.commit().map_err(be)?;
            publish(&changes, &updated);
            Ok(updated)
        })
        .await
    }

    async fn record_decision(
        &self,
        task_id: &str,
        approval: Approval,
    ) -> Result<DecisionRecord, StoreError> {
        let task_id = task_id.to_owned();
        let changes = self.changes.clone();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            let task = read_task(&tx, &task_id)?.ok_or_else(|| StoreError::NotFound {
                kind: "AgentTask",
                id: task_id.clone(),
            })?;
            tx.execute(
                "INSERT INTO approvals (task_id, approval) VALUES (?1, ?2)",
                params![task_id, to_json(&approval)?],
            )
            .map_err(be)?;
            let name = format!("{task_id}-{}", tx.last_insert_rowid());
            tx.commit().map_err(be)?;
            // The task did not change, but whoever decides about it must look again.
            publish(&changes, &task);
            Ok(DecisionRecord {
                name,
                task_id,
                approval,
            })
        })
        .await
    }

    async fn decisions(&self, task_id: &str) -> Result<Vec<DecisionRecord>, StoreError> {
        let task_id = task_id.to_owned();
        self.call(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT id, approval FROM approvals WHERE task_id = ?1 ORDER BY id")
                .map_err(be)?;
            let rows = stmt
                .query_map(params![task_id], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(be)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, approval) = row.map_err(be)?;
                out.push(DecisionRecord {
                    name: format!("{task_id}-{id}"),
                    task_id: task_id.clone(),
                    approval: from_json(&approval)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn get_device(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let name = name.to_owned();
        self.call(move |conn| read_device(conn, &name)).await
    }

    async fn put_device(
        &self,
        name: &str,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError> {
        let name = name.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            tx.execute(
                "INSERT INTO devices (name, spec, status, version) VALUES (?1, ?2, '{}', 1)
                     ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, version = version + 1",
                params![name, to_json(&spec)?],
            )
            .map_err(be)?;
            let rec = read_device(&tx, &name)?.ok_or_else(|| be("device vanished"))?;
            tx.commit().map_err(be)?;
            Ok(rec)
        })
        .await
    }

    async fn update_device_spec(
        &self,
        name: &str,
        expected: &Version,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError> {
        let name = name.to_owned();
        let expected_n = parse_version("EdgeDevice", &name, expected)?;
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            let changed = tx
                .execute(
                    "UPDATE devices SET spec = ?1, version = version + 1 WHERE name = ?2 AND version = ?3",
                    params![to_json(&spec)?, name, expected_n],
                )
                .map_err(be)?;
            if changed == 0 {
                return Err(match read_device(&tx, &name)? {
                    Some(_) => StoreError::Conflict {
                        kind: "EdgeDevice",
                        id: name,
                        expected: expected_n.to_string(),
                    },
                    None => StoreError::NotFound {
                        kind: "EdgeDevice",
                        id: name,
                    },
                });
            }
            let rec = read_device(&tx, &name)?.ok_or_else(|| be("device vanished"))?;
            tx.commit().map_err(be)?;
            Ok(rec)
        })
        .await
    }

    async fn enroll(&self, e: Enrollment) -> Result<EnrollOutcome, StoreError> {
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            let token: Option<(i64, Option<String>)> = tx
                .query_row(
                    "SELECT expires_at, used_by FROM join_tokens WHERE hash = ?1",
                    params![e.token_hash],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(be)?;
            let now = Timestamp::now().as_second();
            let (spendable, spent_by_this_device) = match &token {
                None => (false, false),
                Some((expires, used_by)) => (
                    used_by.is_none() && *expires > now,
                    used_by.as_deref() == Some(e.device_id.as_str()),
                ),
            };
            if let Some(existing) = read_device(&tx, &e.device_id)? {
                if !(spendable || spent_by_this_device) {
                    return Ok(EnrollOutcome::InvalidToken);
                }
                return Ok(super::reenrollment(&existing, &e.spec));
            }
            if !spendable {
                return Ok(EnrollOutcome::InvalidToken);
            }
            tx.execute(
                "INSERT INTO devices (name, spec, status, version) VALUES (?1, ?2, '{}', 1)",
                params![e.device_id, to_json(&e.spec)?],
            )
            .map_err(be)?;
            tx.execute(
                "UPDATE join_tokens SET used_by = ?1 WHERE hash = ?2",
                params![e.device_id, e.token_hash],
            )
            .map_err(be)?;
            let rec = read_device(&tx, &e.device_id)?.ok_or_else(|| be("device vanished"))?;
            tx.commit().map_err(be)?;
            Ok(EnrollOutcome::Created(rec))
        })
        .await
    }

    async fn add_join_token(
        &self,
        token_hash: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        let hash = token_hash.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO join_tokens (hash, expires_at) VALUES (?1, ?2)
                     ON CONFLICT(hash) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE used_by IS NULL",
                params![hash, expires_at.as_second()],
            )
            .map_err(be)?;
            Ok(())
        })
        .await
    }

    async fn get_policy(&self) -> Result<Option<AgentPolicySpec>, StoreError> {
        if let Some(cached) = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(cached.clone());
        }
        let cache = self.policy.clone();
        self.call(move |conn| {
            let policy = read_policy(conn)?;
            // Filled on the database thread, after every earlier write: never older than the table.
            *cache.write().unwrap_or_else(|e| e.into_inner()) = Some(policy.clone());
            Ok(policy)
        })
        .await
    }

    async fn put_policy(&self, spec: AgentPolicySpec) -> Result<(), StoreError> {
        let cache = self.policy.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO policies (name, spec, version) VALUES (?1, ?2, 1)
                     ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, version = version + 1",
                params![POLICY_NAME, to_json(&spec)?],
            )
            .map_err(be)?;
            *cache.write().unwrap_or_else(|e| e.into_inner()) = Some(Some(spec));
            Ok(())
        })
        .await
    }

    async fn trip_breaker(&self, trip: BreakerTrip) -> Result<bool, StoreError> {
        let cache = self.policy.clone();
        self.call(move |conn| {
            let tx = conn.transaction().map_err(be)?;
            let Some(mut spec) = read_policy(&tx)? else {
                return Ok(false);
            };
            if spec.suspend {
                return Ok(false);
            }
            spec.suspend = true;
            tx.execute(
                "UPDATE policies SET spec = ?2, version = version + 1 WHERE name = ?1",
                params![POLICY_NAME, to_json(&spec)?],
            )
            .map_err(be)?;
            // Only the trip is new: whatever else the status records (its conditions) stays.
            let mut status = read_policy_status(&tx)?;
            status.last_trip = Some(trip);
            tx.execute(
                "INSERT INTO policy_status (name, status) VALUES (?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET status = excluded.status",
                params![POLICY_NAME, to_json(&status)?],
            )
            .map_err(be)?;
            tx.commit().map_err(be)?;
            *cache.write().unwrap_or_else(|e| e.into_inner()) = Some(Some(spec));
            Ok(true)
        })
        .await
    }

    async fn policy_status(&self) -> Result<Option<AgentPolicyStatus>, StoreError> {
        self.call(move |conn| {
            let exists: bool = conn
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM policies WHERE name = ?1)",
                    params![POLICY_NAME],
                    |r| r.get(0),
                )
                .map_err(be)?;
            if !exists {
                return Ok(None);
            }
            Ok(Some(read_policy_status(conn)?))
        })
        .await
    }

    fn changes(&self) -> broadcast::Receiver<TaskChanged> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane_api::device::{KeyAlgorithm, PublicKey};
    use agentplane_api::intent::{PrivacyLevel, RequiredResources};
    use agentplane_api::task::AgentTaskSpec;
    use agentplane_api::task::DeviceRef;
    use agentplane_api::{Envelope, EnvelopeSignature};

    fn spec(device: &str) -> AgentTaskSpec {
        AgentTaskSpec {
            device_ref: DeviceRef {
                name: device.into(),
            },
            envelope: Envelope {
                payload_type: "t".into(),
                payload: "e30=".into(),
                signatures: vec![EnvelopeSignature {
                    keyid: String::new(),
                    sig: String::new(),
                }],
            },
            user_id: "u".into(),
            intent_type: "echo".into(),
            privacy_level: PrivacyLevel::Public,
            required_resources: RequiredResources::default(),
            cancel: None,
        }
    }

    fn device_spec() -> EdgeDeviceSpec {
        EdgeDeviceSpec {
            public_keys: vec![PublicKey {
                id: "k1".into(),
                alg: KeyAlgorithm::Ed25519,
                key: "A".repeat(44),
                not_after: None,
            }],
            owner: "o".into(),
            allowed_intents: vec![],
            revoked: false,
        }
    }

    fn new_task(id: &str, seq: u64) -> NewTask {
        NewTask {
            id: id.into(),
            spec: spec("d1"),
            seq,
            trace_id: None,
        }
    }

    async fn store() -> (tempfile::TempDir, Arc<SqliteStore>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
        let s = SqliteStore::new(db, "default");
        s.put_device("d1", device_spec()).await.unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn admit_applies_the_seq_window_and_is_idempotent() {
        use super::super::seq_window::SeqRefusal;
        use agentplane_api::device::SEQ_WINDOW;
        let (_d, s) = store().await;
        let created = |a: Admission| matches!(a, Admission::Created(_));
        assert!(created(s.admit(new_task("t100", 100)).await.unwrap()));
        // The same task id again is the existing task (idempotent), whatever the window says.
        assert!(matches!(
            s.admit(new_task("t100", 100)).await.unwrap(),
            Admission::Existing(_)
        ));
        // Out of order within the window: accepted, lastSeq stays at the highest.
        assert!(created(s.admit(new_task("t98", 98)).await.unwrap()));
        assert!(created(s.admit(new_task("t99", 99)).await.unwrap()));
        // A new task id under a seq already taken: refused.
        for seq in [98, 100] {
            assert_eq!(
                s.admit(new_task(&format!("again{seq}"), seq))
                    .await
                    .unwrap(),
                Admission::SeqReplay(SeqRefusal::Taken { last_seq: 100 })
            );
        }
        // The boundary: lastSeq - W + 1 is inside, lastSeq - W is not.
        assert_eq!(
            s.admit(new_task("old", 100 - SEQ_WINDOW)).await.unwrap(),
            Admission::SeqReplay(SeqRefusal::BelowWindow { last_seq: 100 })
        );
        assert!(created(
            s.admit(new_task("oldest", 100 - SEQ_WINDOW + 1))
                .await
                .unwrap()
        ));
        assert!(created(s.admit(new_task("t101", 101)).await.unwrap()));
        let dev = s.get_device("d1").await.unwrap().unwrap();
        assert_eq!(dev.status.last_seq, Some(101));
        assert!(dev.status.last_seen.is_some());
        // The window is read back from the stored status; 37 slid out when lastSeq became 101.
        assert_eq!(
            s.admit(new_task("again99", 99)).await.unwrap(),
            Admission::SeqReplay(SeqRefusal::Taken { last_seq: 101 })
        );
        assert_eq!(
            s.admit(new_task("again37", 37)).await.unwrap(),
            Admission::SeqReplay(SeqRefusal::BelowWindow { last_seq: 101 })
        );
        assert!(created(s.admit(new_task("t97", 97)).await.unwrap()));
    }

    #[tokio::test]
    async fn status_writes_are_conditional_and_follow_the_phase_machine() {
        let (_d, s) = store().await;
        let Admission::Created(t) = s.admit(new_task("t1", 1)).await.unwrap() else {
            panic!("not created")
        };
        let queued = AgentTaskStatus {
            phase: Some(TaskPhase::Queued),
            ..t.status.clone()
        };
        let t2 = s
            .update_task_status("t1", &t.version, queued.clone())
            .await
            .unwrap();
        // The old version no longer writes.
        assert!(matches!(
            s.update_task_status("t1", &t.version, queued).await,
            Err(StoreError::Conflict { .. })
        ));
        // Queued -> Succeeded skips Running: refused.
        let done = AgentTaskStatus {
            phase: Some(TaskPhase::Succeeded),
            ..t2.status.clone()
        };
        assert!(matches!(
            s.update_task_status("t1", &t2.version, done).await,
            Err(StoreError::IllegalTransition { .. })
        ));
    }

    #[tokio::test]
    async fn join_tokens_are_single_use() {
        let (_d, s) = store().await;
        s.add_join_token("h", Timestamp::now() + jiff::SignedDuration::from_secs(60))
            .await
            .unwrap();
        let enroll = |name: &str| Enrollment {
            token_hash: "h".into(),
            device_id: name.into(),
            spec: device_spec(),
        };
        assert!(matches!(
            s.enroll(enroll("d2")).await.unwrap(),
            EnrollOutcome::Created(_)
        ));
        assert!(matches!(
            s.enroll(enroll("d2")).await.unwrap(),
            EnrollOutcome::AlreadyEnrolled(_)
        ));
        assert_eq!(
            s.enroll(enroll("d3")).await.unwrap(),
            EnrollOutcome::InvalidToken
        );
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let s = SqliteStore::new(Db::open(&path).unwrap(), "default");
            s.put_device("d1", device_spec()).await.unwrap();
            s.admit(new_task("t1", 1)).await.unwrap();
        }
        let s = SqliteStore::new(Db::open(&path).unwrap(), "default");
        assert!(s.get_task("t1").await.unwrap().is_some());
        assert_eq!(s.list_unfinished().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn list_tasks_returns_every_phase_oldest_first() {
        let (_d, s) = store().await;
        for (i, id) in ["t1", "t2", "t3"].iter().enumerate() {
            s.admit(new_task(id, i as u64 + 1)).await.unwrap();
        }
        let t2 = s.get_task("t2").await.unwrap().unwrap();
        let denied = AgentTaskStatus {
            phase: Some(TaskPhase::Denied),
            ..t2.status.clone()
        };
        s.update_task_status("t2", &t2.version, denied)
            .await
            .unwrap();
        let all = s.list_tasks().await.unwrap();
        let ids: Vec<_> = all.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["t1", "t2", "t3"]);
        assert_eq!(all[1].phase(), TaskPhase::Denied);
        assert_eq!(s.list_unfinished().await.unwrap().len(), 2);
    }
}
