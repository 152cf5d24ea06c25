//! The audit log's share of `ci/bench/runtime`: what an append and a checkpoint cost per event.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::checkpoint::Ed25519Signer;
use super::log::{AuditLog, AuditLogConfig, LogError};
use super::{AuditEvent, EventKind};

/// Figures from [`bench_append_and_checkpoint`].
#[derive(Clone, Debug)]
pub struct AuditBench {
    pub events: u64,
    pub concurrency: usize,
    pub checkpoint_every: u64,
    pub wall: Duration,
    pub appends_per_sec: f64,
    /// Latency of one append (until its leaf is fsynced), per quantile.
    pub append_p50: Duration,
    pub append_p99: Duration,
    pub checkpoints: u64,
    /// Mean cost of one checkpoint (consistency proof, Ed25519 signature, fsynced insert).
    pub checkpoint_mean: Duration,
    /// What the log adds to one task event: mean append latency + checkpoint cost / checkpoint_every.
    pub per_event: Duration,
}

impl std::fmt::Display for AuditBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "audit log: {} events x{} writers, {:.0} appends/s, append p50 {:?} p99 {:?}, \
             checkpoint every {} = {:?} each ({} signed), per event {:?}",
            self.events,
            self.concurrency,
            self.appends_per_sec,
            self.append_p50,
            self.append_p99,
            self.checkpoint_every,
            self.checkpoint_mean,
            self.checkpoints,
            self.per_event,
        )
    }
}

/// Appends `events` task-like events from `concurrency` writers into a fresh log under `dir` (Ed25519
/// signer, the `agentplane dev` setup), signing a checkpoint after every `checkpoint_every` appends, and
/// measures both. Appends from concurrent writers share fsyncs (group commit), as in the runtime.
pub async fn bench_append_and_checkpoint(
    dir: &Path,
    events: u64,
    checkpoint_every: u64,
    concurrency: usize,
) -> Result<AuditBench, LogError> {
    let concurrency = concurrency.max(1);
    let checkpoint_every = checkpoint_every.max(1);
    let mut config = AuditLogConfig::new(dir.join("audit-bench.sqlite"), "agentplane.dev/bench");
    // The bench signs explicitly, so the background triggers stay out of the measurement.
    config.checkpoint_every = u64::MAX;
    config.checkpoint_interval = Duration::from_secs(24 * 3600);
    let log = AuditLog::open(config, Arc::new(Ed25519Signer::generate()?)).await?;

    let next = Arc::new(AtomicU64::new(0));
    let checkpoint_nanos = Arc::new(AtomicU64::new(0));
    let checkpoints = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut writers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (log, next) = (log.clone(), next.clone());
        let (checkpoint_nanos, checkpoints) = (checkpoint_nanos.clone(), checkpoints.clone());
        writers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= events {
                    return Ok::<_, LogError>(latencies);
                }
                let mut e = AuditEvent::new(EventKind::Transition, "bench", &format!("task-{i}"));
                e.from = Some(agentplane_api::TaskPhase::Queued);
                e.to = Some(agentplane_api::TaskPhase::Running);
                e.details = serde_json::json!({ "version": (i % 7).to_string() });
                let t = Instant::now();
                log.append(format!("bench/task-{i}@1/phase"), e).await?;
                latencies.push(t.elapsed());
                if (i + 1) % checkpoint_every == 0 {
                    let t = Instant::now();
                    log.checkpoint().await?;
                    checkpoint_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    checkpoints.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut latencies = Vec::with_capacity(events as usize);
    for w in writers {
        let lat = w
            .await
            .map_err(|e| LogError::Sql(format!("bench writer: {e}")))??;
        latencies.extend(lat);
    }
    let wall = start.elapsed();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let mean_append = if latencies.is_empty() {
        Duration::ZERO
    } else {
        latencies.iter().sum::<Duration>() / latencies.len() as u32
    };
    let n_checkpoints = checkpoints.load(Ordering::Relaxed);
    let checkpoint_mean = Duration::from_nanos(
        checkpoint_nanos
            .load(Ordering::Relaxed)
            .checked_div(n_checkpoints)
            .unwrap_or(0),
    );
    Ok(AuditBench {
        events,
        concurrency,
        checkpoint_every,
        wall,
        appends_per_sec: events as f64 / wall.as_secs_f64().max(1e-9),
        append_p50: pick(0.50),
        append_p99: pick(0.99),
        checkpoints: n_checkpoints,
        checkpoint_mean,
        per_event: mean_append
            + Duration::from_nanos(
                (checkpoint_mean.as_nanos() / u128::from(checkpoint_every)) as u64,
            ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bench_measures_what_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let b = bench_append_and_checkpoint(dir.path(), 60, 20, 4)
            .await
            .unwrap();
        assert_eq!(b.events, 60);
        assert_eq!(b.checkpoints, 3);
        assert!(b.append_p99 >= b.append_p50);
        assert!(b.per_event > Duration::ZERO);
        assert!(b.to_string().contains("60 events"));
    }
}
