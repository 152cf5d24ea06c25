//! The sender against a gateway that answers 5xx, then garbage, then recovers: it backs off (no tight
//! loop), keeps every intent, reports the device offline, and delivers everything once the gateway
//! answers properly. And with a window of submissions in flight: one entry refused for good and one
//! failing a few times do not hold the others back. The gateway here is an in-test axum handler because the real one does
//! not misbehave on demand; the happy path is tested against the real `agentplane dev` (e2e_dev.rs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_api::wire::{SubmitResponse, TaskView};
use agentplane_api::{Envelope, IntentPayload, TaskPhase};
use agentplane_edge::backoff::Backoff;
use agentplane_edge::capture::{Capturer, IntentRequest, LocalPolicy};
use agentplane_edge::gateway::GatewayClient;
use agentplane_edge::identity::SoftKey;
use agentplane_edge::outbox::{EntryState, Outbox, OutboxConfig};
use agentplane_edge::sender::{Link, Sender, SenderConfig};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    ServerError,
    Garbage,
    Accept,
}

#[derive(Clone)]
struct Gw {
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
    accepted_seqs: Arc<Mutex<Vec<u64>>>,
}

async fn submit(State(gw): State<Gw>, body: Bytes) -> Response {
    gw.hits.fetch_add(1, Ordering::SeqCst);
    let mode = *gw.mode.lock().unwrap();
    match mode {
        Mode::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Mode::Garbage => (StatusCode::OK, "<html>definitely not json").into_response(),
        Mode::Accept => {
            let p = Envelope::parse(&body).unwrap().peek_intent().unwrap();
            accept(&gw.accepted_seqs, p)
        }
    }
}

/// The gateway's 202 for a new task, recording its seq.
fn accept(accepted_seqs: &Mutex<Vec<u64>>, p: IntentPayload) -> Response {
    accepted_seqs.lock().unwrap().push(p.seq);
    (
        StatusCode::ACCEPTED,
        Json(SubmitResponse {
            task_id: p.task_id,
            phase: TaskPhase::Pending,
            duplicate: false,
        }),
    )
        .into_response()
}

async fn task(Path(id): Path<String>) -> Json<TaskView> {
    Json(TaskView {
        task_id: id,
        device_id: "kiosk-1".into(),
        intent_type: "summarize".into(),
        phase: TaskPhase::Succeeded,
        model: None,
        usage: None,
        result: Some("done".into()),
        reason: None,
        approval: None,
        trace_id: None,
    })
}

/// Serves `app` on a free loopback port; returns the base URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// A sender for device kiosk-1 over a fresh outbox holding `n` captured intents (seqs 1..=n).
async fn sender_with_backlog(
    dir: &std::path::Path,
    gateway: &str,
    n: u64,
    cfg: SenderConfig,
) -> Sender {
    let outbox = Outbox::open(OutboxConfig::new(dir.join("o.db"))).unwrap();
    let signer = Arc::new(SoftKey::generate().unwrap());
    let capturer = Capturer {
        outbox: outbox.clone(),
        signer: signer.clone(),
        device_id: "kiosk-1".into(),
        default_user: "alice".into(),
        policy: LocalPolicy::default(),
    };
    for i in 0..n {
        let req: IntentRequest = serde_json::from_value(
            serde_json::json!({"type": "summarize", "prompt": format!("p{i}")}),
        )
        .unwrap();
        capturer.capture(req).await.unwrap();
    }
    Sender {
        outbox,
        client: GatewayClient::new(gateway).unwrap(),
        signer,
        device_id: "kiosk-1".into(),
        cfg,
        link: Arc::new(Link::default()),
        wake: Arc::new(tokio::sync::Notify::new()),
        accepted: Arc::new(tokio::sync::Notify::new()),
    }
}

#[tokio::test]
async fn backs_off_on_5xx_and_garbage_then_delivers_each_once() {
    let gw = Gw {
        mode: Arc::new(Mutex::new(Mode::ServerError)),
        hits: Arc::new(AtomicUsize::new(0)),
        accepted_seqs: Arc::new(Mutex::new(Vec::new())),
    };
    let app = axum::Router::new()
        .route("/v1/intents", post(submit))
        .route("/v1/tasks/{id}", get(task))
        .with_state(gw.clone());
    let base = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = SenderConfig {
        max_in_flight: 1,
        backoff: Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        idle_poll: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
        policy: LocalPolicy::default(),
    };
    let sender = sender_with_backlog(dir.path(), &base, 5, cfg).await;
    let (outbox, link) = (sender.outbox.clone(), sender.link.clone());
    let tracker = sender.clone();
    let submit_loop = tokio::spawn(sender.run_submit_loop());
    let track_loop = tokio::spawn(tracker.run_track_loop());

    // 5xx for 2 s: the pauses are 25-50, 50-100, 100-200, 200-400, then 200-400 ms; a tight loop would
    // make thousands of requests.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hits_5xx = gw.hits.load(Ordering::SeqCst);
    assert!(
        (3..=20).contains(&hits_5xx),
        "{hits_5xx} requests in 2 s of 5xx"
    );
    let state = link.snapshot();
    assert_eq!(state.online, Some(false));
    assert!(
        state.last_error.as_deref().unwrap_or("").contains("500"),
        "{state:?}"
    );
    // Every request was a retry of some entry (recorded on it), and nothing was given up.
    let pending = outbox.pending(10).await.unwrap();
    let attempts: u32 = pending.iter().map(|e| e.attempts).sum();
    assert!(attempts >= 3, "{pending:?}");
    assert_eq!(pending.len(), 5, "nothing dropped");

    // Garbage with a 200: not taken as an acceptance, still backing off at the cap.
    *gw.mode.lock().unwrap() = Mode::Garbage;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hits_garbage = gw.hits.load(Ordering::SeqCst) - hits_5xx;
    assert!(
        hits_garbage <= 10,
        "{hits_garbage} requests in 1.5 s of garbage"
    );
    assert!(
        link.snapshot()
            .last_error
            .unwrap_or_default()
            .contains("not the expected JSON"),
        "{:?}",
        link.snapshot()
    );
    assert_eq!(outbox.counts().await.unwrap().pending, 5);

    *gw.mode.lock().unwrap() = Mode::Accept;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let c = outbox.counts().await.unwrap();
        if c.done == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not drained: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each once; each entry waits out its own backoff, so the order may differ from seq order.
    let mut accepted = gw.accepted_seqs.lock().unwrap().clone();
    accepted.sort();
    assert_eq!(accepted, vec![1, 2, 3, 4, 5]);
    assert_eq!(link.snapshot().online, Some(true));
    for e in outbox.all().await.unwrap() {
        assert_eq!(e.state, EntryState::Done);
        assert_eq!(e.result.as_deref(), Some("done"));
    }
    submit_loop.abort();
    track_loop.abort();
}

/// A gateway that takes 20 ms per submission (so requests overlap), refuses seq 3 for good and answers
/// seq 5 with 503 twice before taking it; it records how many submissions were in flight at once.
#[derive(Clone, Default)]
struct Picky {
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    seq5_failures: Arc<AtomicUsize>,
    accepted_seqs: Arc<Mutex<Vec<u64>>>,
}

async fn picky_submit(State(gw): State<Picky>, body: Bytes) -> Response {
    let now = gw.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    gw.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    gw.in_flight.fetch_sub(1, Ordering::SeqCst);
    let p = Envelope::parse(&body).unwrap().peek_intent().unwrap();
    if p.seq == 3 {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": {"code": "invalid_payload", "message": "never"}})),
        )
            .into_response();
    }
    if p.seq == 5 && gw.seq5_failures.fetch_add(1, Ordering::SeqCst) < 2 {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    accept(&gw.accepted_seqs, p)
}

#[tokio::test]
async fn a_window_of_submissions_where_one_refusal_blocks_nothing() {
    let gw = Picky::default();
    let app = axum::Router::new()
        .route("/v1/intents", post(picky_submit))
        .route("/v1/tasks/{id}", get(task))
        .with_state(gw.clone());
    let base = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 40;
    let cfg = SenderConfig {
        max_in_flight: 8,
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        idle_poll: Duration::from_millis(100),
        ..SenderConfig::default()
    };
    let sender = sender_with_backlog(dir.path(), &base, N, cfg).await;
    let outbox = sender.outbox.clone();
    let submit_loop = tokio::spawn(sender.run_submit_loop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let c = outbox.counts().await.unwrap();
        if c.pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not drained: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    submit_loop.abort();

    let mut accepted = gw.accepted_seqs.lock().unwrap().clone();
    accepted.sort();
    let expected: Vec<u64> = (1..=N).filter(|&s| s != 3).collect();
    assert_eq!(
        accepted, expected,
        "every other entry once, seq 5 after its retries"
    );
    assert_eq!(gw.seq5_failures.load(Ordering::SeqCst), 3);
    let max = gw.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=8).contains(&max),
        "{max} submissions in flight at most"
    );
    let refused = outbox
        .all()
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.seq == 3)
        .unwrap();
    assert_eq!(refused.state, EntryState::Rejected);
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("invalid_payload"),
        "{refused:?}"
    );
    let counts = outbox.counts().await.unwrap();
    assert_eq!((counts.sent + counts.done, counts.rejected), (N - 1, 1));
}
