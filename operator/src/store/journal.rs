//! The plan journal: one durable row per step of a task's plan, written *before* the step's side
//! effect and marked finished after it, so a worker that dies mid-plan resumes at the first
//! unfinished step and never repeats a finished one.
//!
//! Rules, enforced by the writes themselves (not by callers being careful):
//! - [`StepJournal::begin`] inserts a step once; beginning it again returns the row already there
//!   (a resume reads what the dead worker recorded instead of starting the step afresh).
//! - [`StepJournal::finish`] only moves a step out of `pending` / `awaitingApproval`; a finished
//!   step's outcome and result never change again.
//!
//! A step found `pending` on resume was journaled but may or may not have had its effect. The worker
//! runs it again with the same idempotency key (task id + step, sent to the MCP server in
//! `_meta`), so a server that deduplicates by key applies it once; a model step is simply asked
//! again. The embedded implementation is a table in the store's SQLite database (same WAL file,
//! so it is as durable as the task itself); the distributed one is an `AgentTaskStep` object per
//! step (`store::kube_journal`).

use agentplane_api::task::{PlanStep, StepKind, StepOutcome};
use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rusqlite::params;

use super::StoreError;
use super::sqlite::Db;

/// One journaled step, with what a resume needs to rebuild the conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct JournalEntry {
    pub task_id: String,
    pub step: u32,
    pub kind: StepKind,
    /// Tier name, or `server/tool`.
    pub name: String,
    /// The model's id for a tool call (echoed with its result).
    pub call_id: Option<String>,
    /// A tool call's arguments; a model step's reply (its tool calls or answer) once finished.
    pub payload: serde_json::Value,
    pub args_digest: Option<String>,
    pub outcome: StepOutcome,
    /// The tool's result text (or why it was refused); the model's answer for a final model step.
    pub result: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: u64,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub error: Option<String>,
}

impl JournalEntry {
    /// A step about to start.
    pub fn start(task_id: &str, step: u32, kind: StepKind, name: &str) -> JournalEntry {
        JournalEntry {
            task_id: task_id.to_owned(),
            step,
            kind,
            name: name.to_owned(),
            call_id: None,
            payload: serde_json::Value::Null,
            args_digest: None,
            outcome: StepOutcome::Pending,
            result: None,
            input_tokens: 0,
            output_tokens: 0,
            cost_micros: 0,
            started_at: Timestamp::now(),
            finished_at: None,
            error: None,
        }
    }

    /// The summary shown in `status.steps` (never the result text: it may be large or sensitive).
    pub fn summary(&self) -> PlanStep {
        PlanStep {
            index: self.step,
            kind: self.kind,
            name: self.name.clone(),
            args_digest: self.args_digest.clone(),
            outcome: self.outcome,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cost_micros: self.cost_micros,
            started_at: Some(Time(self.started_at)),
            finished_at: self.finished_at.map(Time),
            error: self.error.clone(),
        }
    }
}

/// How a step ended.
#[derive(Clone, Debug, PartialEq)]
pub struct StepEnd {
    pub outcome: StepOutcome,
    pub payload: Option<serde_json::Value>,
    pub result: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: u64,
    pub error: Option<String>,
}

/// What `begin` found.
#[derive(Clone, Debug, PartialEq)]
pub enum Begun {
    /// The step was new and is now journaled as `pending`.
    Started,
    /// The step was journaled before (a resume): this is its row.
    Existing(Box<JournalEntry>),
}

#[async_trait]
pub trait StepJournal: Send + Sync + 'static {
    async fn begin(&self, entry: &JournalEntry) -> Result<Begun, StoreError>;
    /// Finishes a step; `false` when it was already finished (nothing changed).
    async fn finish(&self, task_id: &str, step: u32, end: StepEnd) -> Result<bool, StoreError>;
    /// Parks a pending step for an approver.
    async fn await_approval(&self, task_id: &str, step: u32) -> Result<(), StoreError>;
    /// Every step of a task, in order.
    async fn steps(&self, task_id: &str) -> Result<Vec<JournalEntry>, StoreError>;
    /// The largest tool result this journal holds for one step, if it has a bound of its own.
    fn max_text_bytes(&self) -> Option<usize> {
        None
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS plan_steps (
    task_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    call_id TEXT,
    payload TEXT NOT NULL,
    args_digest TEXT,
    outcome TEXT NOT NULL,
    result TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros INTEGER NOT NULL DEFAULT 0,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    error TEXT,
    PRIMARY KEY (task_id, step)
);
";

/// The embedded journal, in the store's database.
pub struct SqliteJournal {
    db: Db,
}

impl SqliteJournal {
    pub async fn new(db: Db) -> Result<SqliteJournal, StoreError> {
        db.call(|conn| conn.execute_batch(SCHEMA).map_err(StoreError::backend))
            .await?;
        Ok(SqliteJournal { db })
    }
}

fn enum_text<T: serde::Serialize>(v: T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn enum_from<T: serde::de::DeserializeOwned>(s: String) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.clone()))
        .map_err(|e| StoreError::Backend(format!("plan_steps holds an unknown value {s:?}: {e}")))
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn read_rows(
    conn: &rusqlite::Connection,
    task_id: &str,
    step: Option<u32>,
) -> Result<Vec<JournalEntry>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT task_id, step, kind, name, call_id, payload, args_digest, outcome, result,
                    input_tokens, output_tokens, cost_micros, started_at, finished_at, error
             FROM plan_steps WHERE task_id = ?1 AND (?2 IS NULL OR step = ?2) ORDER BY step",
        )
        .map_err(StoreError::backend)?;
    let rows = stmt
        .query_map(params![task_id, step], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(8)?,
                (
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, i64>(11)?,
                ),
                (r.get::<_, i64>(12)?, r.get::<_, Option<i64>>(13)?),
                r.get::<_, Option<String>>(14)?,
            ))
        })
        .map_err(StoreError::backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (
            task_id,
            step,
            kind,
            name,
            call_id,
            payload,
            args_digest,
            outcome,
            result,
            t,
            at,
            error,
        ) = row.map_err(StoreError::backend)?;
        out.push(JournalEntry {
            task_id,
            step,
            kind: enum_from(kind)?,
            name,
            call_id,
            payload: serde_json::from_str(&payload).map_err(StoreError::backend)?,
            args_digest,
            outcome: enum_from(outcome)?,
            result,
            input_tokens: t.0.max(0) as u64,
            output_tokens: t.1.max(0) as u64,
            cost_micros: t.2.max(0) as u64,
            started_at: ts(at.0),
            finished_at: at.1.map(ts),
            error,
        });
    }
    Ok(out)
}

#[async_trait]
impl StepJournal for SqliteJournal {
    async fn begin(&self, entry: &JournalEntry) -> Result<Begun, StoreError> {
        let e = entry.clone();
        self.db
            .call(move |conn| {
                let inserted = conn
                    .execute(
                        "INSERT INTO plan_steps (task_id, step, kind, name, call_id, payload,
                             args_digest, outcome, started_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                         ON CONFLICT (task_id, step) DO NOTHING",
                        params![
                            e.task_id,
                            e.step,
                            enum_text(e.kind),
                            e.name,
                            e.call_id,
                            e.payload.to_string(),
                            e.args_digest,
                            enum_text(StepOutcome::Pending),
                            e.started_at.as_millisecond(),
                        ],
                    )
                    .map_err(StoreError::backend)?;
                if inserted == 1 {
                    return Ok(Begun::Started);
                }
                let existing = read_rows(conn, &e.task_id, Some(e.step))?
                    .pop()
                    .ok_or_else(|| StoreError::Backend("journaled step vanished".into()))?;
                Ok(Begun::Existing(Box::new(existing)))
            })
            .await
    }

    async fn finish(&self, task_id: &str, step: u32, end: StepEnd) -> Result<bool, StoreError> {
        let task_id = task_id.to_owned();
        self.db
            .call(move |conn| {
                let n = conn
                    .execute(
                        "UPDATE plan_steps SET outcome = ?3, payload = COALESCE(?4, payload),
                             result = ?5, input_tokens = ?6, output_tokens = ?7, cost_micros = ?8,
                             finished_at = ?9, error = ?10
                         WHERE task_id = ?1 AND step = ?2
                           AND outcome IN ('pending', 'awaitingApproval')",
                        params![
                            task_id,
                            step,
                            enum_text(end.outcome),
                            end.payload.map(|p| p.to_string()),
                            end.result,
                            i64::try_from(end.input_tokens).unwrap_or(i64::MAX),
                            i64::try_from(end.output_tokens).unwrap_or(i64::MAX),
                            i64::try_from(end.cost_micros).unwrap_or(i64::MAX),
                            Timestamp::now().as_millisecond(),
                            end.error,
                        ],
                    )
                    .map_err(StoreError::backend)?;
                Ok(n == 1)
            })
            .await
    }

    async fn await_approval(&self, task_id: &str, step: u32) -> Result<(), StoreError> {
        let task_id = task_id.to_owned();
        self.db
            .call(move |conn| {
                conn.execute(
                    "UPDATE plan_steps SET outcome = 'awaitingApproval'
                     WHERE task_id = ?1 AND step = ?2 AND outcome = 'pending'",
                    params![task_id, step],
                )
                .map(|_| ())
                .map_err(StoreError::backend)
            })
            .await
    }

    async fn steps(&self, task_id: &str) -> Result<Vec<JournalEntry>, StoreError> {
        let task_id = task_id.to_owned();
        self.db
            .call(move |conn| read_rows(conn, &task_id, None))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn journal(dir: &tempfile::TempDir) -> SqliteJournal {
        let db = Db::open(&dir.path().join("j.db")).unwrap();
        SqliteJournal::new(db).await.unwrap()
    }

    fn done(result: &str) -> StepEnd {
        StepEnd {
            outcome: StepOutcome::Done,
            payload: None,
            result: Some(result.into()),
            input_tokens: 3,
            output_tokens: 4,
            cost_micros: 5,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_step_is_journaled_once_and_a_finished_step_never_changes() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(&dir).await;
        let mut e = JournalEntry::start("t1", 1, StepKind::Tool, "rec/write");
        e.payload = json!({"key": "a"});
        e.call_id = Some("c1".into());
        assert_eq!(j.begin(&e).await.unwrap(), Begun::Started);
        let Begun::Existing(again) = j.begin(&e).await.unwrap() else {
            panic!("a second begin must find the first");
        };
        assert_eq!(again.outcome, StepOutcome::Pending);
        assert_eq!(again.payload, json!({"key": "a"}));
        assert!(j.finish("t1", 1, done("ok")).await.unwrap());
        assert!(
            !j.finish("t1", 1, done("other")).await.unwrap(),
            "a finished step is final"
        );
        let steps = j.steps("t1").await.unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].result.as_deref(), Some("ok"));
        assert_eq!(steps[0].outcome, StepOutcome::Done);
        let s = steps[0].summary();
        assert_eq!(
            (s.index, s.cost_micros, s.outcome),
            (1, 5, StepOutcome::Done)
        );
        assert!(s.finished_at.is_some());
    }

    #[tokio::test]
    async fn the_journal_survives_reopening_and_keeps_tasks_apart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = journal(&dir).await;
            for step in 1..=3 {
                j.begin(&JournalEntry::start("t1", step, StepKind::Model, "tier"))
                    .await
                    .unwrap();
            }
            j.finish("t1", 1, done("a")).await.unwrap();
            j.begin(&JournalEntry::start("t2", 1, StepKind::Model, "tier"))
                .await
                .unwrap();
            j.await_approval("t1", 3).await.unwrap();
        }
        let j = journal(&dir).await;
        let outcomes: Vec<_> = j
            .steps("t1")
            .await
            .unwrap()
            .iter()
            .map(|s| (s.step, s.outcome))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                (1, StepOutcome::Done),
                (2, StepOutcome::Pending),
                (3, StepOutcome::AwaitingApproval)
            ]
        );
        assert_eq!(j.steps("t2").await.unwrap().len(), 1);
        // An approved step can still finish.
        assert!(j.finish("t1", 3, done("approved")).await.unwrap());
    }
}
