//! Measures intents signed and persisted per second (each acknowledged only after its fsync; concurrent
//! captures share commits), beside the disk's own limit measured the same way the issue defines it:
//! raw append + fsync per record of the same size, in the same directory.
//!
//! `cargo run --release -p agentplane-edge --example capture_bench -- <data-dir> [count] [concurrency]`

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use agentplane_edge::agent::{one_shot_capturer, open_outbox};
use agentplane_edge::capture::{IntentRequest, LocalPolicy};
use agentplane_edge::config::Paths;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data_dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: capture_bench <data-dir> [count] [concurrency]"))?;
    let count: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let concurrency: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let paths = Paths::new(&data_dir, None);
    let (rate, envelope_len) = rt.block_on(async {
        let outbox = open_outbox(&paths, u64::MAX, u64::MAX, false)?;
        let capturer = Arc::new(one_shot_capturer(
            &paths,
            outbox.clone(),
            None,
            LocalPolicy::default(),
        )?);
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let per = count.div_ceil(concurrency);
        for w in 0..concurrency {
            let capturer = capturer.clone();
            let n = per.min(count.saturating_sub(w * per));
            set.spawn(async move {
                for i in 0..n {
                    let req = IntentRequest {
                        kind: "summarize".into(),
                        prompt: format!(
                            "bench intent {w}-{i}: summarize the quarterly report for the kiosk"
                        ),
                        privacy_level: agentplane_api::PrivacyLevel::Public,
                        user_id: None,
                        params: Default::default(),
                        gpu: 0,
                        model: None,
                        consent_scopes: vec!["process".into()],
                    };
                    capturer.capture(req).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        let secs = start.elapsed().as_secs_f64();
        let sample = outbox.recent(1).await?;
        let len = sample.first().map(|e| e.envelope.len()).unwrap_or(600);
        anyhow::Ok((count as f64 / secs, len))
    })?;

    // The disk's limit: append one record of the same size and fsync it, over and over.
    let probe = std::path::Path::new(&data_dir).join("fsync-probe.bin");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&probe)?;
    let record = vec![b'x'; envelope_len];
    let n = 2_000;
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&record)?;
        f.sync_data()?;
    }
    let disk = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&probe)?;

    println!("intents_signed_persisted_per_sec {rate:.0}");
    println!("disk_append_fsync_per_sec {disk:.0}");
    println!("ratio_to_disk {:.2}", rate / disk);
    println!("record_bytes {envelope_len} count {count} concurrency {concurrency}");
    Ok(())
}
