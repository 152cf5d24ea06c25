//! The circuit breaker trips in the embedded runtime (`agentplane dev`): failing tasks or spend over
//! `AgentPolicy.spec.circuitBreaker` suspend the namespace, record `status.lastTrip`, append an audit
//! leaf and count `agentplane_circuit_breaker_trips_total`; a task submitted afterwards is held. The
//! last test does the same in the distributed runtime (operator and worker processes over
//! kube-apiserver + etcd and moto), where the trip is also a Kubernetes Event.
//!
//! The model endpoint is a local HTTP server speaking the OpenAI chat-completions wire format (no
//! real model runs here): `/fail/...` answers HTTP 400, which fails a task at once without a retry;
//! `/ok/...` answers a proper completion with usage (11 prompt + 7 completion tokens).

mod cluster;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentplane::audit::{AuditEvent, EventKind};
use agentplane::client::DeviceIdentity;
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::store::{Admission, NewTask, TaskRecord, TaskStore};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{BreakerTrip, CircuitBreaker, EndpointKind, ModelTier, SecretKeyRef};
use agentplane_api::task::AgentTaskSpec;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The scripted endpoint; returns its base URL and the number of calls it answered.
async fn endpoint() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            reply(uri.path())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), calls)
}

fn reply(path: &str) -> Response {
    if path.starts_with("/fail/") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": {"message": "scripted failure", "type": "invalid_request_error"}}),
            ),
        )
            .into_response();
    }
    axum::Json(json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "done"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    }))
    .into_response()
}

/// 11 prompt tokens at 1000 micros per 1k plus 7 completion tokens at 2000: 25 micros a task.
const COST_PER_TASK: u64 = 25;

fn tier(endpoint: String) -> ModelTier {
    ModelTier {
        name: "remote".into(),
        endpoint_kind: EndpointKind::Openai,
        endpoint,
        model: Some("test-model".into()),
        price_per_1k_input_micros: 1000,
        price_per_1k_output_micros: 2000,
        privacy_levels: vec![],
        gpu: false,
        secret_ref: Some(SecretKeyRef {
            name: "openai".into(),
            key: "api-key".into(),
        }),
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    rt: Embedded,
    device: DeviceIdentity,
    calls: Arc<AtomicUsize>,
}

async fn start(path: &str, breaker: CircuitBreaker) -> Harness {
    let (base, calls) = endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("secrets/openai");
    std::fs::create_dir_all(&key).unwrap();
    std::fs::write(key.join("api-key"), "sk-test\n").unwrap();
    let mut policy = default_policy();
    policy.models = vec![tier(format!("{base}/{path}/v1"))];
    policy.circuit_breaker = Some(breaker);
    let rt = Embedded::start(EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        join_tokens: vec!["join".into()],
        resync: Duration::from_millis(200),
        max_receive_count: 2,
        worker: WorkerConfig {
            retry_delay: Duration::from_millis(50),
            wait: Duration::from_millis(100),
            ..WorkerConfig::default()
        },
        initial_policy: Some(policy),
        ..EmbeddedConfig::default()
    })
    .await
    .unwrap();
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
    Harness {
        _dir: dir,
        rt,
        device,
        calls,
    }
}

async fn submit(h: &Harness, seq: u64) -> String {
    let payload = h.device.intent(seq, "summarize", "Say hi");
    let spec = AgentTaskSpec::for_payload(h.device.sign(&payload).unwrap(), &payload);
    let Admission::Created(rec) =
        h.rt.store
            .admit(NewTask {
                id: payload.task_id.clone(),
                spec,
                seq,
                trace_id: None,
            })
            .await
            .unwrap()
    else {
        panic!("not created")
    };
    rec.id
}

async fn wait_terminal(h: &Harness, id: &str) -> TaskRecord {
    for _ in 0..400 {
        let t = h.rt.store.get_task(id).await.unwrap().unwrap();
        if t.phase().is_terminal() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {id} did not finish");
}

async fn suspended(h: &Harness) -> bool {
    h.rt.store.get_policy().await.unwrap().unwrap().suspend
}

/// The policy's `status.lastTrip`.
async fn last_trip(h: &Harness) -> Option<BreakerTrip> {
    h.rt.store.policy_status().await.unwrap().unwrap().last_trip
}

/// Waits for the breaker to have acted on what it saw: it reacts to change events, so the last
/// task's terminal event is followed by at most one policy write.
async fn settle_until_suspended(h: &Harness) -> bool {
    for _ in 0..100 {
        if suspended(h).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn trips_metric(h: &Harness, reason: &str) -> Option<u64> {
    let text = h.rt.metrics.render();
    let series = format!(
        "agentplane_circuit_breaker_trips_total{{namespace=\"default\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse().unwrap())
}

/// The breaker's leaves in the audit log (appended through the pipelined log: polled).
async fn breaker_leaves(h: &Harness, want: usize) -> Vec<AuditEvent> {
    let log =
        h.rt.audit
            .as_ref()
            .expect("the embedded runtime keeps an audit log");
    let mut found = Vec::new();
    for _ in 0..100 {
        found.clear();
        for seq in 0..log.size().await.unwrap() {
            let e = log.leaf(seq).await.unwrap().unwrap().event().unwrap();
            if e.task == "agentpolicy/default" {
                found.push(e);
            }
        }
        if found.len() >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found
}

fn five_failures() -> CircuitBreaker {
    CircuitBreaker {
        window_seconds: 300,
        failures: Some(5),
        failure_percent: None,
        spend_micros: None,
        min_tasks: 5,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_failing_tasks_trip_the_breaker_and_four_do_not() {
    let h = start("fail", five_failures()).await;

    for seq in 1..=4 {
        let id = submit(&h, seq).await;
        assert_eq!(wait_terminal(&h, &id).await.phase(), TaskPhase::Failed);
    }
    // Four failures: the breaker has seen them (the fifth below trips at once) and does not trip.
    assert!(
        !settle_until_suspended(&h).await,
        "4 failures must not trip"
    );
    assert_eq!(last_trip(&h).await, None);
    assert_eq!(trips_metric(&h, "failures"), None);
    assert!(breaker_leaves(&h, 0).await.is_empty());

    let id = submit(&h, 5).await;
    assert_eq!(wait_terminal(&h, &id).await.phase(), TaskPhase::Failed);
    assert!(settle_until_suspended(&h).await, "the fifth failure trips");
    let trip = last_trip(&h).await.expect("status.lastTrip is recorded");
    assert_eq!((trip.tasks, trip.failures), (5, 5));
    assert!(
        trip.reason
            .contains("5 of 5 tasks failed in the last 300 s (limit 5 failures)"),
        "{}",
        trip.reason
    );
    assert_eq!(trips_metric(&h, "failures"), Some(1));
    let leaves = breaker_leaves(&h, 1).await;
    assert_eq!(leaves.len(), 1, "{leaves:?}");
    assert_eq!(leaves[0].kind, EventKind::Decision);
    assert_eq!(leaves[0].actor.as_deref(), Some("circuit-breaker"));
    assert_eq!(leaves[0].reason.as_deref(), Some(trip.reason.as_str()));
    assert_eq!(leaves[0].details["failures"], 5);

    // Suspended: a new task is held Pending (the kill switch), and the model is not called.
    let calls_before = h.calls.load(Ordering::SeqCst);
    let held = submit(&h, 6).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The kill switch holds a task Pending without writing to it (the controller looks again at
    // each resync), so nothing is queued and no model is called.
    let t = h.rt.store.get_task(&held).await.unwrap().unwrap();
    assert_eq!(t.phase(), TaskPhase::Pending);
    assert_eq!(h.rt.queue.depth().await.unwrap(), 0);
    assert_eq!(h.calls.load(Ordering::SeqCst), calls_before);

    // Turning the switch off resumes work; the evidence that tripped it is spent, so one more
    // failure does not trip again, and lastTrip stays as the record.
    let mut policy = h.rt.store.get_policy().await.unwrap().unwrap();
    policy.suspend = false;
    h.rt.store.put_policy(policy).await.unwrap();
    assert_eq!(wait_terminal(&h, &held).await.phase(), TaskPhase::Failed);
    assert!(!settle_until_suspended(&h).await);
    assert_eq!(trips_metric(&h, "failures"), Some(1));
    assert!(last_trip(&h).await.is_some());
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_over_the_window_limit_trips_the_breaker() {
    // 3 tasks spend 75 micros: over 60. Two (50) do not.
    let h = start(
        "ok",
        CircuitBreaker {
            window_seconds: 300,
            failures: None,
            failure_percent: None,
            spend_micros: Some(60),
            min_tasks: 5,
        },
    )
    .await;
    for seq in 1..=2 {
        let id = submit(&h, seq).await;
        let t = wait_terminal(&h, &id).await;
        assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
        assert_eq!(t.status.usage.unwrap().cost_micros, COST_PER_TASK);
    }
    assert!(!settle_until_suspended(&h).await, "50 micros must not trip");

    let id = submit(&h, 3).await;
    assert_eq!(wait_terminal(&h, &id).await.phase(), TaskPhase::Succeeded);
    assert!(settle_until_suspended(&h).await, "75 micros trip");
    let trip = last_trip(&h).await.unwrap();
    assert_eq!(trip.spend_micros, 3 * COST_PER_TASK);
    assert_eq!(trip.failures, 0);
    assert!(
        trip.reason
            .contains("spent 75 micros in the last 300 s (limit 60)"),
        "{}",
        trip.reason
    );
    assert_eq!(trips_metric(&h, "spend"), Some(1));
    assert_eq!(trips_metric(&h, "failures"), None);
    assert_eq!(breaker_leaves(&h, 1).await.len(), 1);
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_failing_tasks_trip_the_breaker_with_an_event_and_an_audit_leaf() {
    use agentplane_api::policy::AgentPolicy;
    use k8s_openapi::api::events::v1::Event;
    use kube::api::Api;

    let c = cluster::Cluster::new("breaker").await;
    let mut policy = cluster::policy();
    policy.circuit_breaker = Some(CircuitBreaker {
        failures: Some(2),
        min_tasks: 2,
        ..five_failures()
    });
    c.store.put_policy(policy).await.unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    let log = audit_dir.path().join("audit.sqlite");
    let operator = c.operator_with(
        "op-breaker",
        &[("AGENTPLANE_AUDIT_LOG", log.to_string_lossy().into_owned())],
    );
    let _worker = c.worker("worker-breaker");
    let d = c.device("kiosk-1").await;
    let policies: Api<AgentPolicy> = Api::namespaced(c.client.clone(), &c.namespace);

    // The builtin:fail tier: each task fails after its retries (dead-lettered).
    let failing = |seq| {
        let mut p = d.intent(seq, "summarize", "this always fails");
        p.required_resources.model = Some("broken".into());
        p
    };
    let first = c.admit(&d, &failing(1)).await;
    assert_eq!(c.wait_terminal(&first).await.phase(), TaskPhase::Failed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !policies.get("default").await.unwrap().spec.suspend,
        "one failure of a 2-failure breaker must not trip"
    );
    let second = c.admit(&d, &failing(2)).await;
    assert_eq!(c.wait_terminal(&second).await.phase(), TaskPhase::Failed);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Two writes (the status subresource, then spec.suspend): wait for both.
    let stored = loop {
        let p = policies.get("default").await.unwrap();
        if p.spec.suspend && p.status.as_ref().is_some_and(|s| s.last_trip.is_some()) {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker did not trip\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let trip = stored
        .status
        .and_then(|s| s.last_trip)
        .expect("status.lastTrip is written");
    assert_eq!((trip.tasks, trip.failures), (2, 2));
    assert!(
        trip.reason.contains("2 of 2 tasks failed"),
        "{}",
        trip.reason
    );

    // The Event on the AgentPolicy.
    let events: Api<Event> = Api::namespaced(c.client.clone(), &c.namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("CircuitBreakerTripped")
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("AgentPolicy")
            });
        if let Some(e) = found {
            assert!(
                e.note.unwrap_or_default().contains("2 of 2 tasks failed"),
                "the Event says why"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CircuitBreakerTripped Event"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The metric on the operator's /metrics.
    let m = cluster::samples(&operator.metrics_text().await);
    let trips: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("agentplane_circuit_breaker_trips_total")
                && k.contains("reason=\"failures\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(trips, 1.0, "{m:?}");

    // Suspended: a new task stays Pending and nothing is queued for it.
    let held = c.admit(&d, &d.intent(3, "summarize", "held")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = c.store.get_task(&held).await.unwrap().unwrap();
    assert_eq!(t.phase(), TaskPhase::Pending);

    // The audit leaf, from the operator's log once it has stopped.
    operator.terminate().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentplane"))
        .args(["audit", "export", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leaves: Vec<AuditEvent> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| AuditEvent::from_leaf(l.as_bytes()).unwrap())
        .filter(|e| e.task == "agentpolicy/default")
        .collect();
    assert_eq!(leaves.len(), 1, "{leaves:?}");
    assert_eq!(leaves[0].kind, EventKind::Decision);
    assert_eq!(leaves[0].reason.as_deref(), Some(trip.reason.as_str()));
}
