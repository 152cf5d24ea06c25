//! The embedded runtime beyond the gateway's request handling: tasks created around the gateway,
//! TLS serving, and the loopback-only rule for plain HTTP.

use std::time::Duration;

use agentplane::client::DeviceIdentity;
use agentplane::gateway::serve::{self, ServeError, TlsFiles};
use agentplane::runtime::{Embedded, EmbeddedConfig};
use agentplane::store::{Admission, NewTask, TaskStore};
use agentplane_api::TaskPhase;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::task::AgentTaskSpec;

fn config(dir: &std::path::Path) -> EmbeddedConfig {
    EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        join_tokens: vec!["join".into()],
        resync: Duration::from_millis(200),
        ..EmbeddedConfig::default()
    }
}

async fn wait_terminal(store: &dyn TaskStore, id: &str) -> agentplane::store::TaskRecord {
    for _ in 0..200 {
        let t = store.get_task(id).await.unwrap().unwrap();
        if t.phase().is_terminal() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {id} did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_created_around_the_gateway_are_reverified_and_denied() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(config(dir.path())).await.unwrap();
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
    let mallory = DeviceIdentity::generate("kiosk-1").unwrap();

    let create = |payload: agentplane_api::IntentPayload, signer: &DeviceIdentity| {
        let envelope = signer.sign(&payload).unwrap();
        let spec = AgentTaskSpec::for_payload(envelope, &payload);
        NewTask {
            id: payload.task_id.clone(),
            spec,
            seq: payload.seq,
            trace_id: None,
        }
    };

    // 1. Signed by a key the device never registered.
    let forged = create(device.intent(1, "summarize", "x"), &mallory);
    // 2. Genuinely signed, but a display field was edited to route it differently.
    let mut edited = create(device.intent(2, "summarize", "x"), &device);
    edited.spec.intent_type = "translate".into();
    // 3. Genuinely signed, but stored under another task's name.
    let mut renamed = create(device.intent(3, "summarize", "x"), &device);
    renamed.id = "some-other-name".into();
    // 4. A genuine one, to show the controller is running.
    let genuine = create(device.intent(4, "summarize", "fine"), &device);

    let mut ids = Vec::new();
    for t in [forged, edited, renamed, genuine] {
        let Admission::Created(rec) = rt.store.admit(t).await.unwrap() else {
            panic!("not created")
        };
        ids.push(rec.id);
    }
    let expected = [
        (TaskPhase::Denied, "bad_signature"),
        (TaskPhase::Denied, "display_mismatch"),
        (TaskPhase::Denied, "task_id_mismatch"),
        (TaskPhase::Succeeded, ""),
    ];
    for (id, (phase, code)) in ids.iter().zip(expected) {
        let t = wait_terminal(&*rt.store, id).await;
        assert_eq!(t.phase(), phase, "{id}: {:?}", t.status.reason);
        if !code.is_empty() {
            assert!(
                t.status.reason.as_deref().unwrap_or("").starts_with(code),
                "{:?}",
                t.status.reason
            );
            assert!(t.status.result.is_none());
        }
    }
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_on_loopback() {
    let err = serve::bind("0.0.0.0:0".parse().unwrap(), None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ServeError::PlainOffLoopback(_)), "{err}");
    assert!(
        serve::bind("127.0.0.1:0".parse().unwrap(), None)
            .await
            .is_ok()
    );
    assert!(
        serve::bind("[::1]:0".parse().unwrap(), None).await.is_ok()
            || std::net::TcpListener::bind("[::1]:0").is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_rustls() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = certified.cert.pem();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();

    let mut cfg = config(&dir.path().join("data"));
    cfg.tls = Some(TlsFiles { cert, key });
    let rt = Embedded::start(cfg).await.unwrap();
    assert!(rt.base_url().starts_with("https://"));
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .resolve("localhost", rt.addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", rt.addr.port());
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::get(format!("http://{}/healthz", rt.addr)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("missing.pem"),
    };
    let err = serve::bind("127.0.0.1:0".parse().unwrap(), Some(&files))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ServeError::Tls(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runtime_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = Embedded::start(config(dir.path())).await.unwrap();
    let second = Embedded::start(config(dir.path())).await;
    assert!(
        matches!(
            second,
            Err(agentplane::runtime::RuntimeError::Locked { .. })
        ),
        "a second runtime started on the same data directory"
    );
    first.stop().await;
    // The lock goes with the runtime.
    Embedded::start(config(dir.path()))
        .await
        .unwrap()
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sheds_load_beyond_its_bounds_with_503() {
    use tokio::io::AsyncWriteExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.gateway.max_in_flight = 1;
    cfg.gateway.request_timeout = Duration::from_secs(3);
    let rt = Embedded::start(cfg).await.unwrap();
    // One request occupies the only slot while its body trickles in.
    let mut slow = tokio::net::TcpStream::connect(rt.addr).await.unwrap();
    slow.write_all(b"POST /v1/intents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = reqwest::get(format!("{}/healthz", rt.base_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: agentplane_api::wire::ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error.code, "overloaded");
    drop(slow);
    // The slot comes back once the slow request is gone.
    let mut ok = false;
    for _ in 0..50 {
        if reqwest::get(format!("{}/healthz", rt.base_url()))
            .await
            .unwrap()
            .status()
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the gateway did not recover after the slow client left");
    rt.stop().await;
}

/// A model that counts its calls and takes a while, so two attempts can overlap.
struct CountingModel(std::sync::atomic::AtomicU64);

#[async_trait::async_trait]
impl agentplane::models::ModelClient for CountingModel {
    async fn complete(
        &self,
        call: &agentplane::models::ModelCall<'_>,
    ) -> Result<agentplane::models::Completion, agentplane::models::ModelError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(agentplane::models::Completion {
            text: format!("done: {}", call.prompt),
            input_tokens: 1,
            output_tokens: 2,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_is_exactly_once_and_finished_tasks_never_rerun() {
    use agentplane::controller::{Outcome, reconcile};
    use agentplane::queue::sqlite::SqliteQueue;
    use agentplane::queue::{Outgoing, TaskQueue};
    use agentplane::store::sqlite::{Db, SqliteStore};
    use agentplane::worker::{Handled, Worker, WorkerConfig};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
    let store = SqliteStore::new(db.clone(), "default");
    let queue = SqliteQueue::new(db.clone(), "tasks", None);
    store
        .put_policy(agentplane::runtime::default_policy())
        .await
        .unwrap();
    let device = DeviceIdentity::generate("kiosk-1").unwrap();
    store
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
    let payload = device.intent(1, "summarize", "once");
    let spec = AgentTaskSpec::for_payload(device.sign(&payload).unwrap(), &payload);
    let Admission::Created(task) = store
        .admit(NewTask {
            id: payload.task_id.clone(),
            spec,
            seq: 1,
            trace_id: None,
        })
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    // The controller queues it (one message)...
    assert_eq!(
        reconcile(&*store, &*queue, &task).await.unwrap(),
        Outcome::Moved(TaskPhase::Queued)
    );
    // ...and a duplicate delivery appears (an at-least-once queue may do that).
    let body = {
        let d = queue
            .receive(1, Duration::ZERO, Duration::ZERO)
            .await
            .unwrap();
        d[0].body.clone()
    };
    queue
        .send(Outgoing {
            body: body.clone(),
            attributes: Default::default(),
            group_id: None,
            dedup_id: None,
        })
        .await
        .unwrap();
    let model = Arc::new(CountingModel(Default::default()));
    let worker = Arc::new(Worker {
        store: store.clone(),
        queue: queue.clone(),
        dead_letters: SqliteQueue::new(db, "tasks-dlq", None),
        models: model.clone(),
        metrics: Default::default(),
        config: WorkerConfig::default(),
        plans: Default::default(),
    });
    // Two workers take the two copies at once: both may call the model, only one completes.
    let deliveries = queue
        .receive(10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 2);
    let (a, b) = tokio::join!(worker.handle(&deliveries[0]), worker.handle(&deliveries[1]));
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Handled::Succeeded)
            .count(),
        1,
        "{outcomes:?}"
    );
    let done = store.get_task(&task.id).await.unwrap().unwrap();
    assert_eq!(done.phase(), TaskPhase::Succeeded);
    assert_eq!(done.status.result.as_deref(), Some("done: once"));
    let calls = model.0.load(Ordering::SeqCst);
    assert!(calls <= 2);
    // The loser's copy is either handed back or left hidden until its visibility timeout (when it
    // lost the completion write, the task was still Running under the winner). Bring every copy
    // round now: each is dropped without running the finished task again.
    queue.release_orphaned_leases().await.unwrap();
    for d in queue
        .receive(10, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap()
    {
        assert_eq!(worker.handle(&d).await.unwrap(), Handled::Dropped);
    }
    assert_eq!(model.0.load(Ordering::SeqCst), calls);
    // Every copy is gone, and a late redelivery of a finished task is dropped without a model call.
    assert_eq!(queue.depth().await.unwrap(), 0);
    queue
        .send(Outgoing {
            body,
            attributes: Default::default(),
            group_id: None,
            dedup_id: None,
        })
        .await
        .unwrap();
    let late = queue
        .receive(1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(worker.handle(&late[0]).await.unwrap(), Handled::Dropped);
    assert_eq!(model.0.load(Ordering::SeqCst), calls);
    assert_eq!(queue.depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_policy_stops_workers_taking_work() {
    use agentplane::controller::reconcile;
    use agentplane::queue::TaskQueue;
    use agentplane::queue::sqlite::SqliteQueue;
    use agentplane::store::sqlite::{Db, SqliteStore};
    use agentplane::worker::{Handled, Worker, WorkerConfig};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("db.sqlite")).unwrap();
    let store = SqliteStore::new(db.clone(), "default");
    let queue = SqliteQueue::new(db.clone(), "tasks", None);
    let mut policy = agentplane::runtime::default_policy();
    store.put_policy(policy.clone()).await.unwrap();
    let device = DeviceIdentity::generate("kiosk-1").unwrap();
    let spec = EdgeDeviceSpec {
        public_keys: vec![device.public_key()],
        owner: "o".into(),
        allowed_intents: vec![],
        revoked: false,
    };
    store.put_device("kiosk-1", spec).await.unwrap();
    let payload = device.intent(1, "summarize", "later");
    let task_spec = AgentTaskSpec::for_payload(device.sign(&payload).unwrap(), &payload);
    let new = NewTask {
        id: payload.task_id.clone(),
        spec: task_spec,
        seq: 1,
        trace_id: None,
    };
    let Admission::Created(task) = store.admit(new).await.unwrap() else {
        panic!("not created")
    };
    reconcile(&*store, &*queue, &task).await.unwrap();
    policy.suspend = true;
    store.put_policy(policy.clone()).await.unwrap();

    let model = Arc::new(CountingModel(Default::default()));
    let worker = Worker {
        store: store.clone(),
        queue: queue.clone(),
        dead_letters: SqliteQueue::new(db, "tasks-dlq", None),
        models: model.clone(),
        metrics: Default::default(),
        config: WorkerConfig {
            wait: Duration::ZERO,
            ..WorkerConfig::default()
        },
        plans: Default::default(),
    };
    let d = queue
        .receive(1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(worker.handle(&d[0]).await.unwrap(), Handled::Suspended);
    assert_eq!(model.0.load(Ordering::SeqCst), 0);
    assert_eq!(
        store.get_task(&task.id).await.unwrap().unwrap().phase(),
        TaskPhase::Queued
    );

    policy.suspend = false;
    store.put_policy(policy).await.unwrap();
    let d = queue
        .receive(1, Duration::from_secs(30), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(worker.handle(&d[0]).await.unwrap(), Handled::Succeeded);
    assert_eq!(model.0.load(Ordering::SeqCst), 1);
}
