//! The embedded [`TaskQueue`]: rows in the `messages` table of the embedded database, one queue name
//! per logical queue (the main queue and its dead-letter queue share the table).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use rusqlite::params;
use tokio::sync::Notify;

use super::{Delivery, LeaseId, Outgoing, QueueError, TaskQueue};
use crate::store::sqlite::{Db, DbClosed};

impl From<DbClosed> for QueueError {
    fn from(e: DbClosed) -> Self {
        QueueError::backend(e)
    }
}

/// Where messages go after `max_receive_count` receives (an SQS redrive policy).
#[derive(Clone, Debug)]
pub struct Redrive {
    pub dead_letter_queue: String,
    pub max_receive_count: u32,
}

/// Longest sleep between polls while long-polling; a send in this process wakes receivers sooner.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

pub struct SqliteQueue {
    db: Db,
    name: String,
    redrive: Option<Redrive>,
    arrived: Arc<Notify>,
}

impl SqliteQueue {
    pub fn new(db: Db, name: impl Into<String>, redrive: Option<Redrive>) -> Arc<Self> {
        Arc::new(SqliteQueue {
            db,
            name: name.into(),
            redrive,
            arrived: Arc::new(Notify::new()),
        })
    }

    async fn receive_now(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let name = self.name.clone();
        let redrive = self.redrive.clone();
        let visibility_ms = i64::try_from(visibility.as_millis()).unwrap_or(i64::MAX / 2);
        let max = i64::try_from(max.clamp(1, 10)).unwrap_or(10);
        self.call(move |conn| {
                let tx = conn.transaction().map_err(QueueError::backend)?;
                let now = Timestamp::now().as_millisecond();
                let mut out = Vec::new();
                // A few rounds, because messages moved to the DLQ do not count towards `max`.
                for _ in 0..4 {
                    let rows: Vec<(i64, String, String, String, u32)> = {
                        let mut stmt = tx
                            .prepare_cached(
                                "SELECT id, message_id, body, attributes, receive_count FROM messages
                                 WHERE queue = ?1 AND visible_at <= ?2 ORDER BY visible_at, id LIMIT ?3",
                            )
                            .map_err(QueueError::backend)?;
                        stmt.query_map(params![name, now, max - out.len() as i64], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })
                        .map_err(QueueError::backend)?
                        .collect::<Result<_, _>>()
                        .map_err(QueueError::backend)?
                    };
                    if rows.is_empty() {
                        break;
                    }
                    for (id, message_id, body, attributes, count) in rows {
                        if let Some(r) = &redrive
                            && count >= r.max_receive_count
                        {
                            tx.execute(
                                "UPDATE messages SET queue = ?1, receive_count = 0, receipt = NULL,
                                 dedup_id = NULL, visible_at = ?2 WHERE id = ?3",
                                params![r.dead_letter_queue, now, id],
                            )
                            .map_err(QueueError::backend)?;
                            continue;
                        }
                        let receipt = uuid::Uuid::new_v4().to_string();
                        tx.execute(
                            "UPDATE messages SET receive_count = receive_count + 1, receipt = ?1,
                             visible_at = ?2 WHERE id = ?3",
                            params![receipt, now.saturating_add(visibility_ms), id],
                        )
                        .map_err(QueueError::backend)?;
                        let attributes: BTreeMap<String, String> =
                            serde_json::from_str(&attributes).unwrap_or_default();
                        out.push(Delivery {
                            lease: LeaseId(receipt),
                            message_id,
                            body,
                            attributes,
                            receive_count: count.saturating_add(1),
                        });
                    }
                    if out.len() as i64 >= max {
                        break;
                    }
                }
                tx.commit().map_err(QueueError::backend)?;
                Ok(out)
            })
            .await
    }

    /// Makes every message received but not deleted visible again at once, and invalidates its lease.
    ///
    /// Only for start-up of a runtime that is the queue's sole consumer (the embedded runtime holds
    /// the data directory's lock): leases from before a crash belong to workers that no longer exist,
    /// so waiting out their visibility timeout would only delay the work. Returns how many were freed.
    pub async fn release_orphaned_leases(&self) -> Result<usize, QueueError> {
        let name = self.name.clone();
        self.call(move |conn| {
            conn.execute(
                "UPDATE messages SET visible_at = ?1, receipt = NULL
                 WHERE queue = ?2 AND receipt IS NOT NULL AND visible_at > ?1",
                params![Timestamp::now().as_millisecond(), name],
            )
            .map_err(QueueError::backend)
        })
        .await
    }

    async fn call<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, QueueError> + Send + 'static,
    {
        self.db.call(f).await
    }

    async fn set_visible_at(&self, lease: &LeaseId, visible_at: i64) -> Result<(), QueueError> {
        let (name, receipt) = (self.name.clone(), lease.0.clone());
        self.call(move |conn| {
            let n = conn
                .execute(
                    "UPDATE messages SET visible_at = ?1 WHERE queue = ?2 AND receipt = ?3",
                    params![visible_at, name, receipt],
                )
                .map_err(QueueError::backend)?;
            if n == 0 {
                return Err(QueueError::LeaseExpired(receipt));
            }
            Ok(())
        })
        .await
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

#[async_trait]
impl TaskQueue for SqliteQueue {
    async fn send(&self, m: Outgoing) -> Result<String, QueueError> {
        let name = self.name.clone();
        let id = self
            .call(move |conn| {
                let attributes = serde_json::to_string(&m.attributes).map_err(QueueError::backend)?;
                let now = Timestamp::now().as_millisecond();
                let message_id = uuid::Uuid::now_v7().to_string();
                let inserted = conn
                    .execute(
                        "INSERT OR IGNORE INTO messages
                         (queue, message_id, body, attributes, group_id, dedup_id, visible_at, sent_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                        params![name, message_id, m.body, attributes, m.group_id, m.dedup_id, now],
                    )
                    .map_err(QueueError::backend)?;
                if inserted == 1 {
                    return Ok(message_id);
                }
                // Deduplicated: answer with the message already there.
                conn.query_row(
                    "SELECT message_id FROM messages WHERE queue = ?1 AND dedup_id = ?2",
                    params![name, m.dedup_id],
                    |r| r.get(0),
                )
                .map_err(QueueError::backend)
            })
            .await?;
        self.arrived.notify_one();
        Ok(id)
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before looking, so a send between the look and the sleep wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let got = self.receive_now(max, visibility).await?;
            let now = tokio::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = POLL_INTERVAL.min(deadline - now);
            let _ = tokio::time::timeout(nap, arrived).await;
        }
    }

    async fn extend(&self, lease: &LeaseId, visibility: Duration) -> Result<(), QueueError> {
        self.set_visible_at(
            lease,
            Timestamp::now().as_millisecond() + millis(visibility),
        )
        .await
    }

    async fn release(&self, lease: &LeaseId, delay: Duration) -> Result<(), QueueError> {
        self.set_visible_at(lease, Timestamp::now().as_millisecond() + millis(delay))
            .await?;
        if delay.is_zero() {
            self.arrived.notify_one();
        }
        Ok(())
    }

    async fn delete(&self, lease: &LeaseId) -> Result<(), QueueError> {
        let (name, receipt) = (self.name.clone(), lease.0.clone());
        self.call(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM messages WHERE queue = ?1 AND receipt = ?2",
                    params![name, receipt],
                )
                .map_err(QueueError::backend)?;
            if n == 0 {
                return Err(QueueError::LeaseExpired(receipt));
            }
            Ok(())
        })
        .await
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let name = self.name.clone();
        self.call(move |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM messages WHERE queue = ?1",
                params![name],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(QueueError::backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dedup: &str) -> Outgoing {
        Outgoing {
            body: format!("body-{dedup}"),
            attributes: BTreeMap::from([("taskId".into(), dedup.into())]),
            group_id: None,
            dedup_id: Some(dedup.into()),
        }
    }

    fn queues() -> (tempfile::TempDir, Arc<SqliteQueue>, Arc<SqliteQueue>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("q.sqlite")).unwrap();
        let main = SqliteQueue::new(
            db.clone(),
            "tasks",
            Some(Redrive {
                dead_letter_queue: "tasks-dlq".into(),
                max_receive_count: 2,
            }),
        );
        let dlq = SqliteQueue::new(db, "tasks-dlq", None);
        (dir, main, dlq)
    }

    const NOW: Duration = Duration::ZERO;

    #[tokio::test]
    async fn dedup_visibility_and_delete() {
        let (_d, q, _) = queues();
        let a = q.send(msg("t1")).await.unwrap();
        assert_eq!(q.send(msg("t1")).await.unwrap(), a, "deduplicated");
        let got = q.receive(10, Duration::from_secs(30), NOW).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, 1);
        assert_eq!(got[0].attributes["taskId"], "t1");
        // Hidden while leased.
        assert!(
            q.receive(10, Duration::from_secs(30), NOW)
                .await
                .unwrap()
                .is_empty()
        );
        q.extend(&got[0].lease, Duration::from_secs(30))
            .await
            .unwrap();
        q.delete(&got[0].lease).await.unwrap();
        assert!(matches!(
            q.delete(&got[0].lease).await,
            Err(QueueError::LeaseExpired(_))
        ));
        assert_eq!(q.depth().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn redelivery_invalidates_old_leases_then_dead_letters() {
        let (_d, q, dlq) = queues();
        q.send(msg("t1")).await.unwrap();
        let first = q.receive(1, Duration::ZERO, NOW).await.unwrap();
        let second = q.receive(1, Duration::ZERO, NOW).await.unwrap();
        assert_eq!(second[0].receive_count, 2);
        assert!(matches!(
            q.delete(&first[0].lease).await,
            Err(QueueError::LeaseExpired(_))
        ));
        // Received twice already: the third receive moves it to the DLQ.
        assert!(q.receive(1, Duration::ZERO, NOW).await.unwrap().is_empty());
        let dead = dlq.receive(1, Duration::from_secs(5), NOW).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].body, "body-t1");
    }

    #[tokio::test]
    async fn long_poll_wakes_on_send() {
        let (_d, q, _) = queues();
        let q2 = q.clone();
        let rx = tokio::spawn(async move {
            q2.receive(1, Duration::from_secs(5), Duration::from_secs(10))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        q.send(msg("t1")).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
    }
}
