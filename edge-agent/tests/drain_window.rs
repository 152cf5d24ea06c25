//! Draining a backlog with a window of submissions in flight, against the real `agentplane dev`:
//! 2,000 intents queued offline, the agent SIGKILLed twice mid-drain, and every intent admitted exactly
//! once (counted in the runtime's own store), none refused. Timing goals live in ci/bench/edge/run.sh.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use agentplane_edge::agent::{one_shot_capturer, open_outbox};
use agentplane_edge::capture::{IntentRequest, LocalPolicy};
use agentplane_edge::config::Paths;
use agentplane_edge::outbox::Outbox;
use common::{enroll, free_port, random_u64, require_agentplane, start_dev, start_edge, wait_for};

const TOTAL: u64 = 2_000;

/// Captures `n` intents straight into the outbox (the agent is not running), 32 at a time.
async fn capture_offline(data: &Path, n: u64) -> Outbox {
    let paths = Paths::new(data, None);
    let outbox = open_outbox(&paths, u64::MAX, u64::MAX, false).unwrap();
    let capturer =
        Arc::new(one_shot_capturer(&paths, outbox.clone(), None, LocalPolicy::default()).unwrap());
    let mut set = tokio::task::JoinSet::new();
    for w in 0..32 {
        let capturer = capturer.clone();
        set.spawn(async move {
            for i in (w..n).step_by(32) {
                let req: IntentRequest = serde_json::from_value(serde_json::json!({
                    "type": "summarize", "prompt": format!("queued offline {i}")
                }))
                .unwrap();
                capturer.capture(req).await.unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    outbox
}

async fn wait_pending_below(outbox: &Outbox, below: u64, secs: u64) {
    wait_for(&format!("pending < {below}"), secs, || async {
        outbox.counts().await.unwrap().pending < below
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2000_intent_backlog_drains_with_a_window_exactly_once_through_sigkills() {
    let bin = require_agentplane();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let gw_dir = dir.path().join("gw");
    let data = dir.path().join("edge");

    let gw = start_dev(&bin, &gw_dir, &listen, "tok-drain");
    enroll(&data, &gw.addr, "tok-drain", "kiosk-drain");
    gw.terminate();
    let outbox = capture_offline(&data, TOTAL).await;
    assert_eq!(outbox.counts().await.unwrap().pending, TOTAL);

    // Gateway back; the agent drains with its default window and is SIGKILLed twice on the way, at
    // random points (with up to 32 submissions in flight and acceptances not yet recorded).
    let gw = start_dev(&bin, &gw_dir, &listen, "tok-drain");
    for below in [
        TOTAL - 300 - random_u64() % 400,
        TOTAL / 2 - random_u64() % 400,
    ] {
        let agent = start_edge(&data, &["--backoff-max-ms", "500"]);
        wait_pending_below(&outbox, below, 600).await;
        agent.sigkill();
        eprintln!("SIGKILL with {:?}", outbox.counts().await.unwrap());
    }
    let agent = start_edge(&data, &["--backoff-max-ms", "500"]);
    wait_pending_below(&outbox, 1, 600).await;
    agent.terminate();
    let counts = outbox.counts().await.unwrap();
    assert_eq!(counts.rejected, 0, "nothing refused: {counts:?}");
    assert_eq!(counts.pending, 0, "{counts:?}");

    // The runtime's own store: one task per intent, each seq once, the same task ids as the outbox.
    let metrics = reqwest_edge::get(format!("{}/metrics", gw.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("agentplane_intents_total") && l.contains("replayed_seq")),
        "{metrics}"
    );
    gw.terminate();
    let db = rusqlite::Connection::open(gw_dir.join("agentplane.sqlite")).unwrap();
    let mut stmt = db
        .prepare("SELECT id, seq FROM tasks WHERE device = 'kiosk-drain' ORDER BY seq")
        .unwrap();
    let tasks: Vec<(String, u64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tasks.len() as u64, TOTAL, "exactly one task per intent");
    assert_eq!(
        tasks.iter().map(|t| t.1).collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>()
    );
    let at_runtime: HashSet<String> = tasks.into_iter().map(|t| t.0).collect();
    let in_outbox: HashSet<String> = outbox
        .all()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.task_id)
        .collect();
    assert_eq!(at_runtime, in_outbox);
}
