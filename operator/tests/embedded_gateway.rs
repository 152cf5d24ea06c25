//! The gateway over real HTTP in front of the embedded store: `agentplane dev`'s runtime started
//! in-process on a loopback port with a temporary data directory.

use std::time::Duration;

use agentplane::client::{ClientError, DeviceIdentity, GatewayClient};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{EndpointKind, ModelTier};
use agentplane_api::wire::{ErrorBody, TaskView};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const JOIN_TOKENS: [&str; 3] = ["join-a", "join-b", "join-c"];
const APPROVER_TOKEN: &str = "approver-secret";

fn config(dir: &std::path::Path) -> EmbeddedConfig {
    EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        join_tokens: JOIN_TOKENS.iter().map(|s| s.to_string()).collect(),
        gateway: GatewayConfig {
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(2),
            approvers: vec![ApproverCredential::new("admin", APPROVER_TOKEN)],
            sse_poll: Duration::from_millis(200),
            ..GatewayConfig::default()
        },
        worker: WorkerConfig {
            concurrency: 2,
            visibility: Duration::from_secs(3),
            wait: Duration::from_millis(200),
            retry_delay: Duration::from_millis(50),
            call_timeout: Duration::from_secs(10),
        },
        max_receive_count: 2,
        resync: Duration::from_millis(500),
        ..EmbeddedConfig::default()
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    rt: Embedded,
    client: GatewayClient,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(config(dir.path())).await.unwrap();
    let client = GatewayClient::new(&rt.base_url());
    Harness {
        _dir: dir,
        rt,
        client,
    }
}

async fn enrolled(h: &Harness, name: &str, token: &str) -> DeviceIdentity {
    let d = DeviceIdentity::generate(name).unwrap();
    let (status, resp) = h.client.enroll(token, &d, "owner").await.unwrap();
    assert_eq!(status, 201);
    assert!(!resp.already_enrolled);
    d
}

async fn wait_terminal(h: &Harness, d: &DeviceIdentity, id: &str) -> TaskView {
    for _ in 0..200 {
        let v = h.client.task(d, id).await.unwrap();
        if v.phase.is_terminal() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} did not finish");
}

async fn wait_phase(h: &Harness, d: &DeviceIdentity, id: &str, phase: TaskPhase) -> TaskView {
    for _ in 0..200 {
        let v = h.client.task(d, id).await.unwrap();
        if v.phase == phase {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {id} never reached {phase}");
}

fn api_error(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorBody) {
    match r {
        Err(ClientError::Api { status, body }) => (status.as_u16(), body),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_submit_stream_to_succeeded_and_duplicates_are_one_task() {
    let h = start().await;
    let d = enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;
    // Enrolling again with the same key is harmless.
    let (status, again) = h.client.enroll(JOIN_TOKENS[0], &d, "owner").await.unwrap();
    assert_eq!(status, 200);
    assert!(again.already_enrolled);

    let env = d.sign(&d.intent(1, "summarize", "hello there")).unwrap();
    let first = h.client.submit(&env).await.unwrap();
    assert!(!first.duplicate);
    let second = h.client.submit(&env).await.unwrap();
    assert!(second.duplicate);
    assert_eq!(first.task_id, second.task_id);

    let mut phases = Vec::new();
    let last = h
        .client
        .follow(&d, &first.task_id, |v| phases.push(v.phase))
        .await
        .unwrap();
    assert_eq!(last.phase, TaskPhase::Succeeded, "{last:?}");
    assert_eq!(last.result.as_deref(), Some("echo: hello there"));
    let usage = last.usage.unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens), (2, 3));
    assert!(usage.cost_micros > 0);
    assert_eq!(last.model.unwrap().selected.as_deref(), Some("builtin"));
    assert!(last.trace_id.is_some());
    assert_eq!(phases.last(), Some(&TaskPhase::Succeeded));

    // One task, one message (now deleted), and the envelope resubmitted after completion is still a duplicate.
    assert_eq!(h.rt.store.list_unfinished().await.unwrap().len(), 0);
    // The worker deletes the message right after writing Succeeded: give it that moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.rt.queue.depth().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "message not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = h.client.submit(&env).await.unwrap();
    assert!(third.duplicate);
    assert_eq!(third.phase, TaskPhase::Succeeded);
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reads_only_its_own_tasks() {
    let h = start().await;
    let owner = enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;
    let other = enrolled(&h, "kiosk-2", JOIN_TOKENS[1]).await;
    let accepted = h
        .client
        .submit(&owner.sign(&owner.intent(1, "summarize", "mine")).unwrap())
        .await
        .unwrap();
    wait_terminal(&h, &owner, &accepted.task_id).await;

    let (status, body) = api_error(h.client.task(&other, &accepted.task_id).await);
    assert_eq!((status, body.error.code.as_str()), (404, "not_found"));
    let (status, _) = api_error(h.client.follow(&other, &accepted.task_id, |_| {}).await);
    assert_eq!(status, 404);
    let (status, _) = api_error(h.client.cancel(&other, &accepted.task_id).await);
    assert_eq!(status, 404);

    // No credentials, a forged signature, and a skewed clock are all 401 with the server's time.
    let url = format!("{}/v1/tasks/{}", h.rt.base_url(), accepted.task_id);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error.code, "missing_credentials");
    assert!(body.error.server_time.is_some());

    let path = format!("/v1/tasks/{}", accepted.task_id);
    let stale = jiff::Timestamp::now().as_second() - 3600;
    let resp = reqwest::Client::new()
        .get(&url)
        .header("authorization", owner.read_auth("GET", &path, stale))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error.code, "clock_skew");
    let server_time = body.error.server_time.unwrap();
    assert!((server_time - jiff::Timestamp::now().as_second()).abs() < 5);

    // A timestamp at the edge of the i64 range is skew, not an overflow.
    for ts in [i64::MIN, i64::MAX] {
        let resp = reqwest::Client::new()
            .get(&url)
            .header(
                "authorization",
                format!("Agentplane-Ed25519 device=kiosk-1,key=k1,ts={ts},sig=AAAA"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.json::<ErrorBody>().await.unwrap().error.code,
            "clock_skew"
        );
    }

    // `other` signing with its own key but claiming to be the owner.
    let forged = other
        .read_auth("GET", &path, jiff::Timestamp::now().as_second())
        .replace("device=kiosk-2", "device=kiosk-1");
    let resp = reqwest::Client::new()
        .get(&url)
        .header("authorization", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error.code, "bad_signature");
    h.rt.stop().await;
}

/// Submits an envelope that must be refused and checks nothing was created or queued.
async fn refused(h: &Harness, env: &agentplane_api::Envelope, status: u16, code: &str) {
    let task_id = env.peek_intent().map(|p| p.task_id).ok();
    let depth = h.rt.queue.depth().await.unwrap();
    let (got, body) = api_error(h.client.submit(env).await);
    assert_eq!(
        (got, body.error.code.as_str()),
        (status, code),
        "{}",
        body.error.message
    );
    if let Some(id) = task_id {
        assert!(
            h.rt.store.get_task(&id).await.unwrap().is_none(),
            "task {id} was created"
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Earlier tasks may finish (and their messages go) meanwhile; nothing may be added.
    assert!(
        h.rt.queue.depth().await.unwrap() <= depth,
        "something was queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_envelopes_create_and_queue_nothing() {
    let h = start().await;
    let d = enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;

    // Unknown device: signed by a key nobody enrolled.
    let stranger = DeviceIdentity::generate("stranger").unwrap();
    refused(
        &h,
        &stranger
            .sign(&stranger.intent(1, "summarize", "x"))
            .unwrap(),
        401,
        "unknown_device",
    )
    .await;

    // Tampered payload: the signature was over different bytes.
    let mut tampered = d.sign(&d.intent(1, "summarize", "pay 1 EUR")).unwrap();
    let mut p = tampered.peek_intent().unwrap();
    p.intent.prompt = "pay 1000 EUR".into();
    use base64::Engine as _;
    tampered.payload =
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&p).unwrap());
    refused(&h, &tampered, 401, "bad_signature").await;

    // Signed by another device's key while claiming to be kiosk-1.
    let mut impostor = DeviceIdentity::generate("kiosk-1").unwrap();
    impostor.key_id = d.key_id.clone();
    refused(
        &h,
        &impostor
            .sign(&impostor.intent(1, "summarize", "x"))
            .unwrap(),
        401,
        "bad_signature",
    )
    .await;

    // Replayed sequence: seq 70 accepted, then a new task with seq 70 (taken) and one with seq 6 (at
    // lastSeq - 64, below the replay window).
    let ok = h
        .client
        .submit(&d.sign(&d.intent(70, "summarize", "x")).unwrap())
        .await
        .unwrap();
    wait_terminal(&h, &d, &ok.task_id).await;
    refused(
        &h,
        &d.sign(&d.intent(70, "summarize", "again")).unwrap(),
        409,
        "replayed_seq",
    )
    .await;
    refused(
        &h,
        &d.sign(&d.intent(6, "summarize", "older")).unwrap(),
        409,
        "replayed_seq",
    )
    .await;

    // Same task id, different content.
    let mut reuse = d.intent(71, "summarize", "different");
    reuse.task_id = ok.task_id.clone();
    let (status, body) = api_error(h.client.submit(&d.sign(&reuse).unwrap()).await);
    assert_eq!(
        (status, body.error.code.as_str()),
        (409, "task_id_conflict")
    );

    // Expired key.
    let mut dev = h.rt.store.get_device("kiosk-1").await.unwrap().unwrap();
    dev.spec.public_keys[0].not_after = Some(Time(
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60),
    ));
    h.rt.store
        .put_device("kiosk-1", dev.spec.clone())
        .await
        .unwrap();
    refused(
        &h,
        &d.sign(&d.intent(7, "summarize", "x")).unwrap(),
        401,
        "key_expired",
    )
    .await;

    // Revoked device (key back in date, so only the revocation refuses it).
    dev.spec.public_keys[0].not_after = None;
    dev.spec.revoked = true;
    h.rt.store.put_device("kiosk-1", dev.spec).await.unwrap();
    refused(
        &h,
        &d.sign(&d.intent(8, "summarize", "x")).unwrap(),
        403,
        "device_revoked",
    )
    .await;
    let (status, body) = api_error(h.client.task(&d, &ok.task_id).await);
    assert_eq!((status, body.error.code.as_str()), (403, "device_revoked"));
    h.rt.stop().await;
}

async fn raw_post(base: &str, path: &str, content_type: &str, body: Vec<u8>) -> (u16, ErrorBody) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: ErrorBody = resp.json().await.expect("every error is a JSON ErrorBody");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clean_json_errors() {
    let h = start().await;
    let base = h.rt.base_url();
    let json = "application/json";
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("/v1/intents", json, b"{not json".to_vec(), 400, "malformed_envelope"),
        ("/v1/intents", json, b"".to_vec(), 400, "malformed_envelope"),
        ("/v1/intents", json, br#"{"payloadType":"x"}"#.to_vec(), 400, "malformed_envelope"),
        ("/v1/intents", json, br#"{"payloadType":"application/vnd.agentplane.intent.v1+json","payload":"!!","signatures":[{"sig":"AA=="}]}"#.to_vec(), 400, "malformed_payload"),
        ("/v1/intents", json, br#"{"payloadType":"text/plain","payload":"","signatures":[]}"#.to_vec(), 400, "wrong_payload_type"),
        ("/v1/intents", "text/plain", b"{}".to_vec(), 415, "unsupported_media_type"),
        ("/v1/intents", json, vec![b' '; 100 * 1024], 413, "too_large"),
        ("/v1/devices/enroll", json, br#"{"joinToken": "#.to_vec(), 400, "malformed_json"),
        ("/v1/devices/enroll", json, br#"{"joinToken":"join-a","deviceId":"d"}"#.to_vec(), 400, "invalid_request"),
        ("/v1/devices/enroll", json, br#"{"joinToken":"join-a","deviceId":"Bad Name","owner":"o","publicKey":{"id":"k","alg":"ed25519","key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}"#.to_vec(), 400, "invalid_request"),
        ("/v1/devices/enroll", json, br#"{"joinToken":"join-a","deviceId":"d","owner":"o","publicKey":{"id":"k","alg":"ed25519","key":"short"}}"#.to_vec(), 400, "invalid_public_key"),
        ("/v1/devices/enroll", json, br#"{"joinToken":"nope","deviceId":"d","owner":"o","publicKey":{"id":"k","alg":"ed25519","key":"O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik="}}"#.to_vec(), 401, "invalid_join_token"),
        ("/v1/devices/enroll", "application/x-www-form-urlencoded", b"a=b".to_vec(), 415, "unsupported_media_type"),
    ];
    for (path, ct, body, status, code) in cases {
        let (got, err) = raw_post(&base, path, ct, body).await;
        assert_eq!(
            (got, err.error.code.as_str()),
            (status, code),
            "{path}: {}",
            err.error.message
        );
    }
    // Unknown routes and methods are JSON too.
    let resp = reqwest::get(format!("{base}/v2/nothing")).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<ErrorBody>().await.unwrap().error.code,
        "not_found"
    );
    let resp = reqwest::get(format!("{base}/v1/intents")).await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.json::<ErrorBody>().await.unwrap().error.code,
        "method_not_allowed"
    );
    // A spent join token cannot enroll a second device.
    enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;
    let d2 = DeviceIdentity::generate("kiosk-2").unwrap();
    let (status, body) = api_error(h.client.enroll(JOIN_TOKENS[0], &d2, "owner").await);
    assert_eq!(
        (status, body.error.code.as_str()),
        (401, "invalid_join_token")
    );
    // The same name with another key is taken.
    let d1b = DeviceIdentity::generate("kiosk-1").unwrap();
    let (status, body) = api_error(h.client.enroll(JOIN_TOKENS[1], &d1b, "owner").await);
    assert_eq!((status, body.error.code.as_str()), (409, "device_exists"));
    // Nothing above made a task.
    assert!(h.rt.store.list_unfinished().await.unwrap().is_empty());
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_while_others_are_served() {
    let h = start().await;
    let mut slow = tokio::net::TcpStream::connect(h.rt.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/intents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"payl",
    )
    .await
    .unwrap();
    // While that body trickles, others are served promptly.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let resp = reqwest::get(format!("{}/healthz", h.rt.base_url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "healthz waited behind the slow body"
        );
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to the slow request");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_cancel_and_dead_letter_paths() {
    let h = start().await;
    let d = enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;

    // requiresApproval: waits, a device cannot approve, the admin can, and the decision is recorded.
    let t = h
        .client
        .submit(&d.sign(&d.intent(1, "purchase", "tickets")).unwrap())
        .await
        .unwrap();
    wait_phase(&h, &d, &t.task_id, TaskPhase::AwaitingApproval).await;
    let (status, _) = api_error(h.client.decide("wrong-token", &t.task_id, true, None).await);
    assert_eq!(status, 401);
    let decided = h
        .client
        .decide(APPROVER_TOKEN, &t.task_id, true, Some("ok"))
        .await
        .unwrap();
    assert_eq!(decided.approval.as_ref().unwrap().approver, "admin");
    let done = wait_terminal(&h, &d, &t.task_id).await;
    assert_eq!(done.phase, TaskPhase::Succeeded);
    assert_eq!(done.approval.unwrap().comment.as_deref(), Some("ok"));
    let (status, body) = api_error(
        h.client
            .decide(APPROVER_TOKEN, &t.task_id, true, None)
            .await,
    );
    assert_eq!(
        (status, body.error.code.as_str()),
        (409, "not_awaiting_approval")
    );

    // Denied by the approver.
    let t = h
        .client
        .submit(&d.sign(&d.intent(2, "purchase", "a yacht")).unwrap())
        .await
        .unwrap();
    wait_phase(&h, &d, &t.task_id, TaskPhase::AwaitingApproval).await;
    h.client
        .decide(APPROVER_TOKEN, &t.task_id, false, None)
        .await
        .unwrap();
    let done = wait_terminal(&h, &d, &t.task_id).await;
    assert_eq!(done.phase, TaskPhase::Denied);
    assert!(done.reason.unwrap().contains("admin"));

    // Policy with a slow tier and a failing tier.
    let mut policy = default_policy();
    let tier = |name: &str, endpoint: &str| ModelTier {
        name: name.into(),
        endpoint_kind: EndpointKind::Builtin,
        endpoint: endpoint.into(),
        model: None,
        price_per_1k_input_micros: 0,
        price_per_1k_output_micros: 0,
        privacy_levels: vec![],
        gpu: false,
        secret_ref: None,
    };
    policy.models = vec![
        tier("slow", "builtin:sleep"),
        tier("broken", "builtin:fail"),
    ];
    h.rt.store.put_policy(policy).await.unwrap();

    // Cancelled while running: the worker stops and the task ends Cancelled, not Succeeded.
    let mut p = d.intent(3, "summarize", "take your time");
    p.intent.params.insert("sleepMs".into(), 5000.into());
    p.required_resources.model = Some("slow".into());
    let t = h.client.submit(&d.sign(&p).unwrap()).await.unwrap();
    wait_phase(&h, &d, &t.task_id, TaskPhase::Running).await;
    h.client.cancel(&d, &t.task_id).await.unwrap();
    let done = wait_terminal(&h, &d, &t.task_id).await;
    assert_eq!(done.phase, TaskPhase::Cancelled);
    assert!(done.result.is_none());

    // A failing model: retried maxReceiveCount times, then dead-lettered and Failed with the reason.
    let mut p = d.intent(4, "summarize", "doomed");
    p.required_resources.model = Some("broken".into());
    let t = h.client.submit(&d.sign(&p).unwrap()).await.unwrap();
    let done = wait_terminal(&h, &d, &t.task_id).await;
    assert_eq!(done.phase, TaskPhase::Failed);
    let reason = done.reason.unwrap();
    assert!(
        reason.contains("dead-letter") && reason.contains("builtin:fail"),
        "{reason}"
    );
    // The cancelled task's message goes once its worker notices the cancel (heartbeat re-read).
    let mut depth = u64::MAX;
    for _ in 0..60 {
        depth = h.rt.queue.depth().await.unwrap();
        if depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth, 0, "messages left on the queue");
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(config(dir.path())).await.unwrap();
    let client = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-1").unwrap();
    client.enroll(JOIN_TOKENS[0], &d, "owner").await.unwrap();
    let done = client
        .submit(&d.sign(&d.intent(1, "summarize", "before")).unwrap())
        .await
        .unwrap();
    // A task accepted while the kill switch is on stays Pending across the restart.
    let mut policy = rt.store.get_policy().await.unwrap().unwrap();
    for _ in 0..100 {
        if client
            .task(&d, &done.task_id)
            .await
            .unwrap()
            .phase
            .is_terminal()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    policy.suspend = true;
    rt.store.put_policy(policy.clone()).await.unwrap();
    let held = client
        .submit(&d.sign(&d.intent(2, "summarize", "held")).unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.task(&d, &held.task_id).await.unwrap().phase,
        TaskPhase::Pending
    );
    rt.stop().await;

    let rt = Embedded::start(config(dir.path())).await.unwrap();
    let client = GatewayClient::new(&rt.base_url());
    let v = client.task(&d, &done.task_id).await.unwrap();
    assert_eq!(v.phase, TaskPhase::Succeeded);
    assert_eq!(v.result.as_deref(), Some("echo: before"));
    let (status, again) = client.enroll(JOIN_TOKENS[0], &d, "owner").await.unwrap();
    assert_eq!(
        (status.as_u16(), again.already_enrolled, again.last_seq),
        (200, true, Some(2))
    );
    // The replay guard survived too.
    let (status, body) = api_error(
        client
            .submit(&d.sign(&d.intent(2, "summarize", "replay")).unwrap())
            .await,
    );
    assert_eq!((status, body.error.code.as_str()), (409, "replayed_seq"));
    // Lifting the kill switch lets the held task run.
    policy.suspend = false;
    rt.store.put_policy(policy).await.unwrap();
    let h = Harness {
        _dir: dir,
        rt,
        client,
    };
    let v = wait_terminal(&h, &d, &held.task_id).await;
    assert_eq!(v.phase, TaskPhase::Succeeded);
    h.rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_openapi_are_served() {
    let h = start().await;
    let base = h.rt.base_url();
    let health: serde_json::Value = reqwest::get(format!("{base}/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let resp = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("# TYPE agentplane_http_requests counter")
    );
    let doc: serde_json::Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/intents"]["post"].is_object());
    h.rt.stop().await;
}

/// Signs an add-key request for `next` with `current` (both keys of device `d`).
fn add_key_request(
    device_id: &str,
    current: &DeviceIdentity,
    next: &DeviceIdentity,
    ts: i64,
    retire: Option<u64>,
) -> agentplane_api::wire::AddKeyRequest {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = next.public_key();
    let message = agentplane_api::wire::add_key_message(device_id, &key, ts, retire);
    agentplane_api::wire::AddKeyRequest {
        signed_by: current.public_key().id,
        signature: b64.encode(current.sign_bytes(&message).to_bytes()),
        proof: b64.encode(next.sign_bytes(&message).to_bytes()),
        public_key: key,
        ts,
        retire_signing_key_after_secs: retire,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_rotates_its_key_and_only_a_holder_of_both_keys_can() {
    let h = start().await;
    let d = enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;
    let url = format!("{}/v1/devices/kiosk-1/keys", h.rt.base_url());
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http.post(&url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let now = jiff::Timestamp::now().as_second();
    let next = DeviceIdentity::generate_with_key_id("kiosk-1", "k2").unwrap();
    let req = add_key_request("kiosk-1", &d, &next, now, Some(3600));

    // Tampering with any signed part fails: a different key, a proof by someone else, a stale time.
    let mallory = DeviceIdentity::generate("kiosk-1").unwrap();
    let mut swapped = serde_json::to_value(&req).unwrap();
    swapped["publicKey"] = serde_json::to_value(mallory.public_key()).unwrap();
    let (s, b) = post(swapped).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    let mut no_possession = req.clone();
    no_possession.proof = add_key_request("kiosk-1", &d, &mallory, now, Some(3600)).proof;
    let (s, b) = post(serde_json::to_value(&no_possession).unwrap()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("bad_proof")),
        "{b}"
    );
    let stale = add_key_request("kiosk-1", &d, &next, now - 3600, None);
    let (s, b) = post(serde_json::to_value(&stale).unwrap()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("clock_skew")),
        "{b}"
    );
    // Signed by a stranger under the device's key id, and under a key id the device never had.
    let by_stranger = add_key_request("kiosk-1", &mallory, &next, now, None);
    let (s, b) = post(serde_json::to_value(&by_stranger).unwrap()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    let mut unknown = by_stranger.clone();
    unknown.signed_by = "never-registered".into();
    let (s, b) = post(serde_json::to_value(&unknown).unwrap()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unknown_key")),
        "{b}"
    );
    let (s, _) = post(serde_json::json!({"publicKey": 1})).await;
    assert_eq!(s, 400);
    assert_eq!(
        h.rt.store
            .get_device("kiosk-1")
            .await
            .unwrap()
            .unwrap()
            .spec
            .public_keys
            .len(),
        1,
        "nothing was added by a refused request"
    );

    // The real thing: added, the old key retired in an hour; again is harmless.
    let (s, b) = post(serde_json::to_value(&req).unwrap()).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["keyIds"].as_array().unwrap().len(), 2);
    let (s, b) = post(serde_json::to_value(&req).unwrap()).await;
    assert_eq!(
        (s, b["alreadyRegistered"].as_bool()),
        (200, Some(true)),
        "{b}"
    );
    let dev = h.rt.store.get_device("kiosk-1").await.unwrap().unwrap();
    let old = dev
        .spec
        .public_keys
        .iter()
        .find(|k| k.id == d.public_key().id)
        .unwrap();
    let retire_at = old.not_after.as_ref().expect("old key retired").0;
    assert!(retire_at > jiff::Timestamp::now());

    // Intents signed with the new key run; so do the old key's until its notAfter.
    let with_new = next.sign(&next.intent(1, "summarize", "new key")).unwrap();
    let t = h.client.submit(&with_new).await.unwrap();
    assert_eq!(
        wait_terminal(&h, &next, &t.task_id).await.phase,
        TaskPhase::Succeeded
    );
    let with_old = d.sign(&d.intent(2, "summarize", "old key")).unwrap();
    let t = h.client.submit(&with_old).await.unwrap();
    assert_eq!(
        wait_terminal(&h, &d, &t.task_id).await.phase,
        TaskPhase::Succeeded
    );

    // A revoked device cannot add keys.
    let mut spec = dev.spec.clone();
    spec.revoked = true;
    h.rt.store.put_device("kiosk-1", spec).await.unwrap();
    let third = DeviceIdentity::generate_with_key_id("kiosk-1", "k3").unwrap();
    let (s, b) =
        post(serde_json::to_value(add_key_request("kiosk-1", &next, &third, now, None)).unwrap())
            .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (403, Some("device_revoked")),
        "{b}"
    );
    h.rt.stop().await;
}

/// `agentplane approvals|approve|deny` run as processes against this gateway.
async fn approver_cli(h: &Harness, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_agentplane"))
        .args(args)
        .env("AGENTPLANE_GATEWAY", h.rt.base_url())
        .env("AGENTPLANE_APPROVER_TOKEN", APPROVER_TOKEN)
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_list_what_waits_and_decide_from_the_cli() {
    let h = start().await;
    let d = enrolled(&h, "kiosk-1", JOIN_TOKENS[0]).await;
    let waiting = h
        .client
        .submit(
            &d.sign(&d.intent(1, "purchase", "two tickets to Lisbon"))
                .unwrap(),
        )
        .await
        .unwrap();
    wait_phase(&h, &d, &waiting.task_id, TaskPhase::AwaitingApproval).await;
    let runs = h
        .client
        .submit(&d.sign(&d.intent(2, "summarize", "needs nobody")).unwrap())
        .await
        .unwrap();
    wait_terminal(&h, &d, &runs.task_id).await;

    // Only approvers list approvals.
    let (status, body) = api_error(h.client.approvals("wrong-token").await);
    assert_eq!((status, body.error.code.as_str()), (401, "bad_credentials"));
    let signed = h
        .client
        .http
        .get(format!("{}/v1/approvals", h.rt.base_url()))
        .header(
            "authorization",
            d.read_auth("GET", "/v1/approvals", jiff::Timestamp::now().as_second()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 403, "a device is not an approver");

    let list = h.client.approvals(APPROVER_TOKEN).await.unwrap();
    assert_eq!(list.pending.len(), 1, "{list:?}");
    let p = &list.pending[0];
    assert_eq!(
        (
            p.task_id.as_str(),
            p.device_id.as_str(),
            p.intent_type.as_str(),
            p.prompt.as_str()
        ),
        (
            waiting.task_id.as_str(),
            "kiosk-1",
            "purchase",
            "two tickets to Lisbon"
        )
    );
    assert!(p.waiting_since.is_some() && p.step.is_none());

    // The CLI lists it too.
    let out = approver_cli(&h, &["approvals"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&waiting.task_id) && stdout.contains("two tickets"),
        "{stdout}"
    );

    // A decision naming a step the task is not waiting at is refused, by the CLI and the API.
    let out = approver_cli(&h, &["approve", &waiting.task_id, "--step", "2"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not waiting for approval at step 2"),
        "{stderr}"
    );
    let (status, body) = api_error(
        h.client
            .decide_with(
                APPROVER_TOKEN,
                &waiting.task_id,
                true,
                &agentplane_api::wire::ApprovalRequest {
                    step: Some(2),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!((status, body.error.code.as_str()), (409, "step_mismatch"));
    assert_eq!(
        h.client.task(&d, &waiting.task_id).await.unwrap().phase,
        TaskPhase::AwaitingApproval
    );

    // Approved from the CLI: it runs, and nothing is left waiting.
    let out = approver_cli(
        &h,
        &["approve", &waiting.task_id, "--comment", "from the CLI"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Approved by admin"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_terminal(&h, &d, &waiting.task_id).await;
    assert_eq!(done.phase, TaskPhase::Succeeded);
    assert_eq!(
        done.approval.unwrap().comment.as_deref(),
        Some("from the CLI")
    );
    assert!(
        h.client
            .approvals(APPROVER_TOKEN)
            .await
            .unwrap()
            .pending
            .is_empty()
    );

    // Denied from the CLI.
    let denied = h
        .client
        .submit(&d.sign(&d.intent(3, "purchase", "a yacht")).unwrap())
        .await
        .unwrap();
    wait_phase(&h, &d, &denied.task_id, TaskPhase::AwaitingApproval).await;
    let out = approver_cli(&h, &["deny", &denied.task_id]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_terminal(&h, &d, &denied.task_id).await;
    assert_eq!(done.phase, TaskPhase::Denied);
    h.rt.stop().await;
}
