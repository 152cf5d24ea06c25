//! The local runner against a local model that misbehaves: answers that are not JSON, answers far
//! larger than any intent's result may be, and a server that is busy (503) before it recovers. The
//! server here is an in-test axum handler because the real llama.cpp server does not misbehave on
//! demand; the real one is tested in local_model.rs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane_api::PrivacyLevel;
use agentplane_edge::backoff::Backoff;
use agentplane_edge::capture::{Capturer, IntentRequest, LocalPolicy};
use agentplane_edge::identity::SoftKey;
use agentplane_edge::local_model::{LocalModel, LocalModelConfig, MAX_ANSWER_BYTES};
use agentplane_edge::local_runner::LocalRunner;
use agentplane_edge::outbox::{Entry, EntryState, Outbox, OutboxConfig, RunsOn};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Garbage,
    Huge,
    Busy,
    Answer,
}

#[derive(Clone)]
struct Model {
    mode: Arc<Mutex<Mode>>,
    hits: Arc<AtomicUsize>,
}

async fn chat(State(m): State<Model>) -> Response {
    m.hits.fetch_add(1, Ordering::SeqCst);
    let mode = *m.mode.lock().unwrap();
    match mode {
        Mode::Garbage => (StatusCode::OK, "<html>I am a web page</html>").into_response(),
        // A well-formed completion, but twice the size any answer may have.
        Mode::Huge => {
            let text = "x".repeat(MAX_ANSWER_BYTES * 2);
            axum::Json(serde_json::json!({"choices": [{"message": {"role": "assistant", "content": text}}]}))
                .into_response()
        }
        Mode::Busy => (StatusCode::SERVICE_UNAVAILABLE, "loading model").into_response(),
        Mode::Answer => axum::Json(serde_json::json!({
            "model": "m", "choices": [{"message": {"role": "assistant", "content": "fine"}}]
        }))
        .into_response(),
    }
}

struct Rig {
    outbox: Outbox,
    capturer: Capturer,
    model: Model,
    _dir: tempfile::TempDir,
}

async fn rig(mode: Mode) -> Rig {
    agentplane_edge::gateway::install_crypto_provider();
    let model = Model {
        mode: Arc::new(Mutex::new(mode)),
        hits: Arc::new(AtomicUsize::new(0)),
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(model.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).unwrap();
    let capturer = Capturer {
        outbox: outbox.clone(),
        signer: Arc::new(SoftKey::generate().unwrap()),
        device_id: "kiosk-1".into(),
        default_user: "alice".into(),
        policy: LocalPolicy {
            local_model: true,
            ..LocalPolicy::default()
        },
    };
    let runner = LocalRunner {
        outbox: outbox.clone(),
        model: Some(
            LocalModel::new(LocalModelConfig {
                url: format!("http://{addr}/v1"),
                model: "local".into(),
                max_tokens: 16,
                timeout: Duration::from_secs(5),
            })
            .unwrap(),
        ),
        wake: Arc::new(tokio::sync::Notify::new()),
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
    };
    tokio::spawn(runner.run());
    Rig {
        outbox,
        capturer,
        model,
        _dir: dir,
    }
}

async fn capture_private(c: &Capturer) -> String {
    let req: IntentRequest = serde_json::from_value(serde_json::json!({
        "type": "summarize", "prompt": "private stuff", "privacyLevel": PrivacyLevel::Private.as_str()
    }))
    .unwrap();
    let a = c.capture(req).await.unwrap();
    assert_eq!(a.runs_on, RunsOn::Device);
    a.task_id
}

async fn wait_until(outbox: &Outbox, id: &str, what: &str, f: impl Fn(&Entry) -> bool) -> Entry {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = outbox
            .get(id)
            .await
            .unwrap()
            .expect("the entry is never lost");
        if f(&e) {
            return e;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_json_fails_the_intent_with_the_reason() {
    let r = rig(Mode::Garbage).await;
    let id = capture_private(&r.capturer).await;
    let e = wait_until(&r.outbox, &id, "failed", |e| e.state == EntryState::Done).await;
    assert_eq!(e.phase.as_deref(), Some("Failed"));
    let reason = e.reason.unwrap();
    assert!(
        reason.contains("did not answer with an OpenAI chat completion")
            && reason.contains("<html>"),
        "{reason}"
    );
    assert_eq!(e.result, None);
    assert_eq!(e.prompt, "private stuff", "the intent itself is kept");
    // Final, not retried in a loop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.model.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_answer_is_cut_off_not_stored() {
    let r = rig(Mode::Huge).await;
    let id = capture_private(&r.capturer).await;
    let e = wait_until(&r.outbox, &id, "failed", |e| e.state == EntryState::Done).await;
    assert_eq!(e.phase.as_deref(), Some("Failed"));
    assert!(e.reason.unwrap().contains("larger than"));
    assert_eq!(e.result, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_is_retried_with_backoff_until_it_answers() {
    let r = rig(Mode::Busy).await;
    let id = capture_private(&r.capturer).await;
    let e = wait_until(&r.outbox, &id, "retried", |e| e.attempts >= 3).await;
    assert_eq!(e.state, EntryState::Local);
    assert!(e.last_error.unwrap().contains("503"));
    // Backoff, not a tight loop: a few attempts in a quarter second, not thousands.
    let before = r.model.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let during = r.model.hits.load(Ordering::SeqCst) - before;
    assert!(during <= 10, "{during} calls in 250 ms");
    *r.model.mode.lock().unwrap() = Mode::Answer;
    let e = wait_until(&r.outbox, &id, "answered", |e| e.state == EntryState::Done).await;
    assert_eq!(e.phase.as_deref(), Some("Succeeded"));
    assert_eq!(e.result.as_deref(), Some("fine"));
    assert_eq!(e.runs_on, RunsOn::Device);
}
