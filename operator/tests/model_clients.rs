//! The OpenAI-compatible and Anthropic model clients against a local HTTP server.
//!
//! No OpenAI or Anthropic implementation can run offline on this machine, so the server here speaks
//! the documented wire formats (OpenAI chat completions, Anthropic Messages) and records what it was
//! sent: these tests check *our* side of those formats (path, headers, JSON body, reply parsing) and
//! how the clients behave when an endpoint misbehaves (error statuses, garbage, huge or slow replies,
//! redirects, refused connections). The last tests run the whole embedded runtime against the same
//! server, so the worker's handling of each outcome (succeed, fail at once, retry) is covered too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentplane::models::{
    Completion, HttpOptions, ModelCall, ModelClient, ModelError, Models, anthropic,
};
use agentplane::secrets::FileSecrets;
use agentplane_api::policy::{EndpointKind, ModelTier, SecretKeyRef};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const OPENAI_KEY: &str = "sk-test-openai-0123456789abcdef";
const ANTHROPIC_KEY: &str = "sk-ant-test-0123456789abcdef";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Above the clients' 4 MiB cap.
const HUGE: usize = 5 * 1024 * 1024;

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the client sent JSON")
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Starts the test server; its behaviour is chosen by the first path segment:
/// `ok` (a proper reply in the format the rest of the path names), `status/<code>` (that status with
/// an error body that echoes the credential it received, as a careless server might), `garbage`,
/// `shape` (JSON of the wrong shape), `huge` and `huge-stream` (over 4 MiB with and without a
/// Content-Length), `slow` (3 s, then a proper reply) and `redirect` (307 to `/ok/...`).
async fn server() -> (String, Log) {
    let log: Log = Arc::default();
    let app = axum::Router::new().fallback(handle).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), log)
}

async fn handle(State(log): State<Log>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        headers: headers.clone(),
        body: body.to_vec(),
    });
    let mut segments = path.trim_start_matches('/').split('/');
    match segments.next().unwrap_or("") {
        "ok" => proper_reply(&path, &body),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            proper_reply(&path, &body)
        }
        "status" => {
            let code = segments
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::IM_A_TEAPOT);
            let credential = headers
                .get(header::AUTHORIZATION)
                .or_else(|| headers.get("x-api-key"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let message = format!("request refused\n(you sent {credential})");
            (code, axum::Json(json!({"error": {"message": message}}))).into_response()
        }
        "garbage" => (StatusCode::OK, "this is not JSON {").into_response(),
        "shape" => axum::Json(json!({"id": "x", "object": "chat.completion"})).into_response(),
        "huge" => {
            let text = "a".repeat(HUGE);
            axum::Json(json!({"choices": [{"message": {"content": text}}]})).into_response()
        }
        "huge-stream" => {
            let chunks = (0..HUGE / 65536 + 1).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 65536]));
            Body::from_stream(futures::stream::iter(chunks)).into_response()
        }
        "redirect" => (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, "/ok/v1/chat/completions")],
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A reply in the format the path names, echoing the prompt so a test can tell replies apart.
fn proper_reply(path: &str, body: &[u8]) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let prompt = req
        .pointer("/messages/0/content")
        .and_then(Value::as_str)
        .unwrap_or("?");
    if path.ends_with("/chat/completions") {
        axum::Json(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": format!("openai says: {prompt}")}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        }))
        .into_response()
    } else if path.ends_with("/v1/messages") {
        axum::Json(json!({
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "anthropic says: "},
                        {"type": "text", "text": prompt}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 13, "output_tokens": 5}
        }))
        .into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// A secrets directory holding both providers' keys, as `agentplane dev` reads it.
fn secrets_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, key) in [("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)] {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join(name).join("api-key"), format!("{key}\n")).unwrap();
    }
    dir
}

fn models(dir: &tempfile::TempDir, options: &HttpOptions) -> Models {
    Models::with_options(Arc::new(FileSecrets::new(dir.path())), options).unwrap()
}

fn tier(kind: EndpointKind, endpoint: String) -> ModelTier {
    let secret = match kind {
        EndpointKind::Anthropic => "anthropic",
        _ => "openai",
    };
    ModelTier {
        name: "remote".into(),
        endpoint_kind: kind,
        endpoint,
        model: Some("test-model".into()),
        price_per_1k_input_micros: 1000,
        price_per_1k_output_micros: 2000,
        privacy_levels: vec![],
        gpu: false,
        secret_ref: Some(SecretKeyRef {
            name: secret.into(),
            key: "api-key".into(),
        }),
    }
}

async fn ask(models: &Models, tier: &ModelTier, params: &Value) -> Result<Completion, ModelError> {
    let call = ModelCall {
        tier,
        prompt: "Say hi",
        params: params.as_object().unwrap(),
        idempotency_key: "task-1/model/1",
        traceparent: Some(TRACEPARENT),
    };
    models.complete(&call).await
}

fn no_params() -> Value {
    json!({})
}

#[tokio::test]
async fn openai_requests_follow_the_wire_format() {
    let (base, log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());

    let t = tier(EndpointKind::Openai, format!("{base}/ok/v1"));
    let c = ask(
        &m,
        &t,
        &json!({"max_tokens": 64, "temperature": 0.5, "sleepMs": 3}),
    )
    .await
    .unwrap();
    assert_eq!(
        c,
        Completion {
            text: "openai says: Say hi".into(),
            input_tokens: 11,
            output_tokens: 7
        }
    );
    let seen = log.lock().unwrap().pop().unwrap();
    assert_eq!(seen.path, "/ok/v1/chat/completions");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str()),
        "the key file's trailing newline is not part of the key"
    );
    assert_eq!(seen.header("idempotency-key"), Some("task-1/model/1"));
    assert_eq!(seen.header("traceparent"), Some(TRACEPARENT));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert!(seen.header("x-api-key").is_none());
    assert_eq!(
        seen.json(),
        json!({"model": "test-model",
               "messages": [{"role": "user", "content": "Say hi"}],
               "max_tokens": 64, "temperature": 0.5})
    );

    // An endpoint that already names the API path is used as is; params of the wrong type are left out.
    let t = tier(
        EndpointKind::Openai,
        format!("{base}/ok/v1/chat/completions/"),
    );
    ask(&m, &t, &json!({"max_tokens": "many"})).await.unwrap();
    let seen = log.lock().unwrap().pop().unwrap();
    assert_eq!(seen.path, "/ok/v1/chat/completions");
    assert!(seen.json().get("max_tokens").is_none());
}

#[tokio::test]
async fn anthropic_requests_follow_the_wire_format() {
    let (base, log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());

    let t = tier(EndpointKind::Anthropic, format!("{base}/ok"));
    let c = ask(&m, &t, &no_params()).await.unwrap();
    assert_eq!(
        c,
        Completion {
            text: "anthropic says: Say hi".into(),
            input_tokens: 13,
            output_tokens: 5
        }
    );
    let seen = log.lock().unwrap().pop().unwrap();
    assert_eq!(seen.path, "/ok/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(
        seen.header("anthropic-version"),
        Some(anthropic::ANTHROPIC_VERSION)
    );
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("idempotency-key"), Some("task-1/model/1"));
    assert_eq!(seen.header("traceparent"), Some(TRACEPARENT));
    assert!(seen.header("authorization").is_none());
    assert_eq!(
        seen.json(),
        json!({"model": "test-model", "max_tokens": 1024,
               "messages": [{"role": "user", "content": "Say hi"}]})
    );

    // The endpoint may also be given as the /v1 root or the full /v1/messages URL.
    for endpoint in [format!("{base}/ok/v1"), format!("{base}/ok/v1/messages")] {
        let t = tier(EndpointKind::Anthropic, endpoint);
        ask(&m, &t, &json!({"max_tokens": 20})).await.unwrap();
        let seen = log.lock().unwrap().pop().unwrap();
        assert_eq!(seen.path, "/ok/v1/messages");
        assert_eq!(seen.json()["max_tokens"], 20);
    }
}

#[tokio::test]
async fn error_statuses_are_classified_and_never_carry_the_key() {
    let (base, _log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());

    for kind in [EndpointKind::Openai, EndpointKind::Anthropic] {
        let key = if kind == EndpointKind::Openai {
            OPENAI_KEY
        } else {
            ANTHROPIC_KEY
        };
        for code in [429, 500, 503, 529] {
            let t = tier(kind, format!("{base}/status/{code}"));
            let e = ask(&m, &t, &no_params()).await.unwrap_err();
            assert!(matches!(e, ModelError::Failed(_)), "{code}: {e}");
            assert!(e.is_retryable());
            let msg = e.to_string();
            assert!(msg.contains(&format!("HTTP {code}")), "{msg}");
            assert!(msg.contains("request refused"), "excerpt kept: {msg}");
            assert!(!msg.contains(key), "the key leaked: {msg}");
            assert!(!msg.contains('\n'), "excerpts are one line: {msg}");
        }
        for code in [400, 401, 403, 404] {
            let t = tier(kind, format!("{base}/status/{code}"));
            let e = ask(&m, &t, &no_params()).await.unwrap_err();
            assert!(matches!(e, ModelError::Rejected(_)), "{code}: {e}");
            assert!(!e.is_retryable());
            let msg = e.to_string();
            assert!(msg.contains(&format!("HTTP {code}")), "{msg}");
            assert!(!msg.contains(key), "the key leaked: {msg}");
            assert!(!format!("{e:?}").contains(key), "the key leaked: {e:?}");
        }
    }
}

#[tokio::test]
async fn unreadable_replies_fail_with_context() {
    let (base, _log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());

    let e = ask(
        &m,
        &tier(EndpointKind::Openai, format!("{base}/garbage")),
        &no_params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ModelError::Failed(_)), "{e}");
    assert!(e.to_string().contains("not JSON"), "{e}");

    let e = ask(
        &m,
        &tier(EndpointKind::Openai, format!("{base}/shape")),
        &no_params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ModelError::Failed(_)), "{e}");
    assert!(e.to_string().contains("choices[0].message"), "{e}");

    let e = ask(
        &m,
        &tier(EndpointKind::Anthropic, format!("{base}/shape")),
        &no_params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ModelError::Failed(_)), "{e}");
    assert!(e.to_string().contains("no content array"), "{e}");
}

#[tokio::test]
async fn oversized_replies_are_cut_off() {
    let (base, _log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());
    // With a Content-Length (refused before reading) and streamed without one (refused mid-read).
    for path in ["huge", "huge-stream"] {
        let e = ask(
            &m,
            &tier(EndpointKind::Openai, format!("{base}/{path}")),
            &no_params(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ModelError::Failed(_)), "{path}: {e}");
        assert!(e.to_string().contains("larger than 4194304 bytes"), "{e}");
    }
}

#[tokio::test]
async fn slow_endpoints_time_out() {
    let (base, _log) = server().await;
    let dir = secrets_dir();
    let slow = tier(EndpointKind::Openai, format!("{base}/slow/v1"));

    // The client's own request timeout: a retryable failure.
    let m = models(
        &dir,
        &HttpOptions {
            request_timeout: Duration::from_millis(300),
            ..HttpOptions::default()
        },
    );
    let started = Instant::now();
    let e = ask(&m, &slow, &no_params()).await.unwrap_err();
    assert!(matches!(e, ModelError::Failed(_)), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The caller's timeout (the worker's call timeout) wins over a longer client timeout.
    let m = models(&dir, &HttpOptions::default());
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_millis(300), ask(&m, &slow, &no_params())).await;
    assert!(r.is_err(), "the call outlived its caller's timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn redirects_are_not_followed_and_dead_endpoints_are_retryable() {
    let (base, log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());

    // Following would hand the key to wherever the redirect points.
    let e = ask(
        &m,
        &tier(EndpointKind::Anthropic, format!("{base}/redirect")),
        &no_params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ModelError::Rejected(_)), "{e}");
    assert!(e.to_string().contains("HTTP 307"), "{e}");
    let paths: Vec<String> = log.lock().unwrap().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/redirect/v1/messages"]);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let e = ask(
        &m,
        &tier(EndpointKind::Openai, format!("http://127.0.0.1:{port}/v1")),
        &no_params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ModelError::Failed(_)), "{e}");
    assert!(e.to_string().contains("could not connect"), "{e}");
}

#[tokio::test]
async fn keys_never_travel_in_clear_and_a_missing_key_is_rejected() {
    let (base, log) = server().await;
    let dir = secrets_dir();
    let m = models(&dir, &HttpOptions::default());

    let e = ask(
        &m,
        &tier(EndpointKind::Openai, "http://example.com/v1".into()),
        &no_params(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ModelError::Rejected(_)), "{e}");
    assert!(e.to_string().contains("https"), "{e}");

    let mut t = tier(EndpointKind::Openai, format!("{base}/ok/v1"));
    t.secret_ref = Some(SecretKeyRef {
        name: "openai".into(),
        key: "no-such-key".into(),
    });
    let e = ask(&m, &t, &no_params()).await.unwrap_err();
    assert!(matches!(e, ModelError::Rejected(_)), "{e}");
    assert!(e.to_string().contains("no-such-key"), "{e}");
    t.secret_ref = None;
    let e = ask(&m, &t, &no_params()).await.unwrap_err();
    assert!(e.to_string().contains("needs secretRef"), "{e}");
    assert!(log.lock().unwrap().is_empty(), "nothing was sent");
}

mod through_the_runtime {
    //! The embedded runtime's worker against the test server: a proper reply succeeds with the
    //! endpoint's usage, a 401 fails the task at once, a 503 is retried under the same idempotency key.

    use super::*;
    use agentplane::client::DeviceIdentity;
    use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
    use agentplane::store::{Admission, NewTask, TaskRecord};
    use agentplane::worker::WorkerConfig;
    use agentplane_api::TaskPhase;
    use agentplane_api::device::EdgeDeviceSpec;
    use agentplane_api::task::AgentTaskSpec;

    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

    async fn start(dir: &std::path::Path, endpoint: String) -> (Embedded, DeviceIdentity) {
        // `agentplane dev` reads model keys from <data dir>/secrets/<name>/<key>.
        std::fs::create_dir_all(dir.join("secrets/openai")).unwrap();
        std::fs::write(dir.join("secrets/openai/api-key"), OPENAI_KEY).unwrap();
        let rt = Embedded::start(EmbeddedConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            join_tokens: vec!["join".into()],
            resync: Duration::from_millis(200),
            max_receive_count: 2,
            worker: WorkerConfig {
                retry_delay: Duration::from_millis(100),
                ..WorkerConfig::default()
            },
            ..EmbeddedConfig::default()
        })
        .await
        .unwrap();
        let mut policy = default_policy();
        policy.models = vec![tier(EndpointKind::Openai, endpoint)];
        rt.store.put_policy(policy).await.unwrap();
        let device = DeviceIdentity::generate("kiosk-1").unwrap();
        rt.store
            .put_device(
                "kiosk-1",
                EdgeDeviceSpec {
                    public_keys: vec![device.public_key()],
                    owner: "o".into(),
                    allowed_intents: vec![],
                    revoked: false,
                },
            )
            .await
            .unwrap();
        (rt, device)
    }

    async fn run(rt: &Embedded, device: &DeviceIdentity, seq: u64) -> TaskRecord {
        let payload = device.intent(seq, "summarize", "Say hi");
        let spec = AgentTaskSpec::for_payload(device.sign(&payload).unwrap(), &payload);
        let Admission::Created(rec) = rt
            .store
            .admit(NewTask {
                id: payload.task_id.clone(),
                spec,
                seq,
                trace_id: Some(TRACE_ID.into()),
            })
            .await
            .unwrap()
        else {
            panic!("not created")
        };
        for _ in 0..400 {
            let t = rt.store.get_task(&rec.id).await.unwrap().unwrap();
            if t.phase().is_terminal() {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("task {} did not finish", rec.id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_proper_reply_succeeds_with_the_endpoints_usage() {
        let (base, log) = server().await;
        let dir = tempfile::tempdir().unwrap();
        let (rt, device) = start(dir.path(), format!("{base}/ok/v1")).await;
        let t = run(&rt, &device, 1).await;
        assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
        assert_eq!(t.status.result.as_deref(), Some("openai says: Say hi"));
        let usage = t.status.usage.unwrap();
        assert_eq!((usage.input_tokens, usage.output_tokens), (11, 7));
        // 11 * 1000/1000 + 7 * 2000/1000 micros.
        assert_eq!(usage.cost_micros, 25);
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let expected_key = format!("{}/model/1", t.id);
        assert_eq!(
            seen[0].header("idempotency-key"),
            Some(expected_key.as_str())
        );
        assert!(
            seen[0]
                .header("traceparent")
                .is_some_and(|tp| tp.starts_with(&format!("00-{TRACE_ID}-"))),
            "{:?}",
            seen[0].header("traceparent")
        );
        rt.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_call_fails_the_task_without_retrying() {
        let (base, log) = server().await;
        let dir = tempfile::tempdir().unwrap();
        let (rt, device) = start(dir.path(), format!("{base}/status/401")).await;
        let t = run(&rt, &device, 1).await;
        assert_eq!(t.phase(), TaskPhase::Failed);
        let reason = t.status.reason.unwrap_or_default();
        assert!(
            reason.contains("rejected") && reason.contains("HTTP 401"),
            "{reason}"
        );
        assert!(
            !reason.contains(OPENAI_KEY),
            "the key leaked into the task: {reason}"
        );
        assert_eq!(
            log.lock().unwrap().len(),
            1,
            "a rejected call is not retried"
        );
        rt.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_endpoint_is_retried_under_the_same_idempotency_key() {
        let (base, log) = server().await;
        let dir = tempfile::tempdir().unwrap();
        let (rt, device) = start(dir.path(), format!("{base}/status/503")).await;
        let t = run(&rt, &device, 1).await;
        assert_eq!(t.phase(), TaskPhase::Failed);
        let reason = t.status.reason.unwrap_or_default();
        assert!(
            reason.contains("dead-letter") && reason.contains("HTTP 503"),
            "{reason}"
        );
        let keys: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.header("idempotency-key").unwrap_or("").to_owned())
            .collect();
        assert_eq!(keys.len(), 2, "one call per delivery (max_receive_count 2)");
        assert!(
            keys.iter().all(|k| *k == format!("{}/model/1", t.id)),
            "{keys:?}"
        );
        rt.stop().await;
    }
}
