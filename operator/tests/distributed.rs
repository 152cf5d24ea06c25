//! The distributed runtime end to end: `agentplane gateway`, `operator` and `worker` processes over
//! kube-apiserver + etcd and SQS on moto (no fake API server, no fake queue).

mod cluster;

use std::time::Duration;

use agentplane::client::{ClientError, DeviceIdentity};
use agentplane::queue::{Outgoing, TaskQueue};
use agentplane::store::TaskStore;
use agentplane::store::kubernetes::task_object;
use agentplane_api::TaskPhase;
use agentplane_api::task::{AgentTask, AgentTaskSpec};
use cluster::{APPROVER, APPROVER_TOKEN, Cluster, JOIN_TOKEN};
use kube::api::{Api, PostParams};

fn slow(d: &DeviceIdentity, seq: u64, ms: u64) -> agentplane_api::IntentPayload {
    let mut p = d.intent(seq, "summarize", "take your time");
    p.required_resources.model = Some("slow".into());
    p.intent
        .params
        .insert("sleepMs".into(), serde_json::json!(ms));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_flow_through_policy_approval_and_cancellation() {
    let mut c = Cluster::new("flow").await;
    let gw = c.start_gateway().await;
    let _operator = c.operator("op-a");

    // Queued with no worker running: cancel it there.
    let d = DeviceIdentity::generate("kiosk-1").unwrap();
    let (status, _) = gw.enroll(JOIN_TOKEN, &d, "owner").await.unwrap();
    assert_eq!(status, 201);
    let queued = gw
        .submit(&d.sign(&d.intent(1, "summarize", "never runs")).unwrap())
        .await
        .unwrap();
    c.wait_phase(
        &queued.task_id,
        |p| p == TaskPhase::Queued,
        Duration::from_secs(60),
    )
    .await;
    gw.cancel(&d, &queued.task_id).await.unwrap();
    let t = c.wait_terminal(&queued.task_id).await;
    assert_eq!(t.phase(), TaskPhase::Cancelled, "{:?}", t.status);

    let _worker = c.worker("worker-a");

    // The happy path, followed over server-sent events.
    let ok = gw
        .submit(&d.sign(&d.intent(2, "summarize", "hello cluster")).unwrap())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let last = gw
        .follow(&d, &ok.task_id, |v| seen.push(v.phase))
        .await
        .unwrap();
    assert_eq!(last.phase, TaskPhase::Succeeded, "{last:?}\n{}", c.logs());
    assert_eq!(last.result.as_deref(), Some("echo: hello cluster"));
    assert!(last.usage.unwrap().cost_micros > 0);
    let stored = c.store.get_task(&ok.task_id).await.unwrap().unwrap();
    let conditions: Vec<(&str, &str)> = stored
        .status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str()))
        .collect();
    for expected in [
        ("Admitted", "True"),
        ("Completed", "True"),
        ("Running", "False"),
    ] {
        assert!(conditions.contains(&expected), "{conditions:?}");
    }
    assert!(stored.status.trace_id.is_some());

    // Denied by policy.
    let shell = gw
        .submit(&d.sign(&d.intent(3, "shell", "rm -rf /")).unwrap())
        .await
        .unwrap();
    let t = c.wait_terminal(&shell.task_id).await;
    assert_eq!(t.phase(), TaskPhase::Denied);
    assert!(t.status.reason.unwrap().contains("intent_not_allowed"));

    // Approval: waits, is approved by a named approver, then runs.
    let buy = gw
        .submit(&d.sign(&d.intent(4, "purchase", "one coffee")).unwrap())
        .await
        .unwrap();
    c.wait_phase(
        &buy.task_id,
        |p| p == TaskPhase::AwaitingApproval,
        Duration::from_secs(60),
    )
    .await;
    let decided = gw
        .decide(APPROVER_TOKEN, &buy.task_id, true, Some("ok"))
        .await
        .unwrap();
    assert_eq!(decided.approval.unwrap().approver, APPROVER);
    let t = c.wait_terminal(&buy.task_id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    assert_eq!(t.status.approval.unwrap().approver, APPROVER);

    // Cancelled while running: the worker stops the model call and lets go of the message.
    let long = gw
        .submit(&d.sign(&slow(&d, 5, 30_000)).unwrap())
        .await
        .unwrap();
    c.wait_phase(
        &long.task_id,
        |p| p == TaskPhase::Running,
        Duration::from_secs(60),
    )
    .await;
    gw.cancel(&d, &long.task_id).await.unwrap();
    let t = c
        .wait_phase(&long.task_id, |p| p.is_terminal(), Duration::from_secs(15))
        .await;
    assert_eq!(t.phase(), TaskPhase::Cancelled);
    // Every message is gone: the cancelled ones were dropped, not left to redeliver.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while c.depth().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue not drained\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_the_task_completes_once() {
    let c = Cluster::new("sigkill").await;
    let _operator = c.operator("op-a");
    let d = c.device("kiosk-1").await;
    let id = c.admit(&d, &slow(&d, 1, 4_000)).await;

    // Count every status write of the task from here on.
    let mut changes = c.store.changes();
    let first = c.worker("worker-1");
    c.wait_phase(&id, |p| p == TaskPhase::Running, Duration::from_secs(60))
        .await;
    first.kill().await;

    let second = c.worker("worker-2");
    let t = c.wait_terminal(&id).await;
    assert_eq!(
        t.phase(),
        TaskPhase::Succeeded,
        "{:?}\n{}",
        t.status.reason,
        c.logs()
    );
    assert_eq!(t.status.result.as_deref(), Some("echo: take your time"));
    // The message was redelivered once: received by the killed worker, then by the second.
    assert_eq!(
        t.status.queue.as_ref().unwrap().receive_count,
        2,
        "{:?}",
        t.status.queue
    );

    let mut succeeded_writes = 0;
    let mut versions = std::collections::BTreeSet::new();
    while let Ok(ev) = changes.try_recv() {
        if ev.id == id
            && ev.phase == TaskPhase::Succeeded
            && versions.insert(ev.task.version.0.clone())
        {
            succeeded_writes += 1;
        }
    }
    assert_eq!(succeeded_writes, 1, "one completion write");
    // The surviving worker made exactly one model call (the killed one's call died with it).
    let m = cluster::samples(&second.metrics_text().await);
    let ok_calls: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("agentplane_model_calls_total") && k.contains("outcome=\"ok\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ok_calls, 1.0, "{m:?}");
    // Nothing left to redeliver.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while c.depth().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "queue not drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_reach_the_dlq_and_their_task_fails() {
    let c = Cluster::new("poison").await;
    let _operator = c.operator("op-a");
    let _worker = c.worker("worker-a");
    let d = c.device("kiosk-1").await;
    let mut payload = d.intent(1, "summarize", "this always fails");
    payload.required_resources.model = Some("broken".into());
    c.admit(&d, &payload).await;
    // A message that names no task at all.
    c.queue
        .send(Outgoing {
            body: "{not json".into(),
            attributes: Default::default(),
            group_id: Some("garbage".into()),
            dedup_id: Some("garbage-1".into()),
        })
        .await
        .unwrap();

    let t = c.wait_terminal(&payload.task_id).await;
    assert_eq!(t.phase(), TaskPhase::Failed);
    let reason = t.status.reason.unwrap();
    assert!(reason.contains("dead-letter"), "{reason}");
    assert!(reason.contains("builtin:fail"), "{reason}");
    // Both poison messages left the main queue and were drained off the DLQ.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (main, dead) = (c.depth().await, c.dlq.depth().await.unwrap());
        if main == 0 && dead == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "main {main}, dlq {dead}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_created_around_the_gateway_with_forged_envelopes_are_denied() {
    let c = Cluster::new("forged").await;
    let _operator = c.operator("op-a");
    let _worker = c.worker("worker-a");
    let d = c.device("kiosk-1").await;
    let mallory = DeviceIdentity::generate("kiosk-1").unwrap();
    let api: Api<AgentTask> = Api::namespaced(c.client.clone(), &c.namespace);

    // Signed by a key the device never registered.
    let p = d.intent(1, "summarize", "forged");
    let spec = AgentTaskSpec::for_payload(mallory.sign(&p).unwrap(), &p);
    api.create(
        &PostParams::default(),
        &task_object(&p.task_id, &c.namespace, spec),
    )
    .await
    .unwrap();
    // Properly signed, but the display copy says something else than the payload.
    let q = d.intent(2, "summarize", "altered");
    let mut spec = AgentTaskSpec::for_payload(d.sign(&q).unwrap(), &q);
    spec.intent_type = "harmless".into();
    api.create(
        &PostParams::default(),
        &task_object(&q.task_id, &c.namespace, spec),
    )
    .await
    .unwrap();
    // Created without our finalizer (as kubectl would): the operator adds it, then decides.
    let r = d.intent(3, "summarize", "bare");
    let spec = AgentTaskSpec::for_payload(mallory.sign(&r).unwrap(), &r);
    let mut bare = task_object(&r.task_id, &c.namespace, spec);
    bare.metadata.finalizers = None;
    api.create(&PostParams::default(), &bare).await.unwrap();

    for (id, code) in [
        (&p.task_id, "bad_signature"),
        (&q.task_id, "display_mismatch"),
        (&r.task_id, "bad_signature"),
    ] {
        let t = c.wait_terminal(id).await;
        assert_eq!(t.phase(), TaskPhase::Denied, "{:?}", t.status.reason);
        let reason = t.status.reason.unwrap_or_default();
        let forged = code == "bad_signature" && reason.contains("unknown_key");
        assert!(reason.contains(code) || forged, "{id}: {reason}");
        assert!(t.status.result.is_none());
    }
    let got = api.get(&r.task_id).await.unwrap();
    assert!(
        got.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&agentplane::store::kubernetes::FINALIZER.to_owned())
    );
    assert_eq!(c.depth().await, 0, "nothing forged was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_suspend_switch_on_no_message_is_taken() {
    let c = Cluster::new("suspend").await;
    let _operator = c.operator("op-a");
    let d = c.device("kiosk-1").await;
    let mut ids = Vec::new();
    for seq in 1..=3 {
        let p = d.intent(seq, "summarize", "wait for me");
        ids.push(c.admit(&d, &p).await);
    }
    for id in &ids {
        c.wait_phase(id, |p| p == TaskPhase::Queued, Duration::from_secs(60))
            .await;
    }
    let mut policy = cluster::policy();
    policy.suspend = true;
    c.store.put_policy(policy.clone()).await.unwrap();

    // The worker starts with the switch on; its poll interval is 1 s (AGENTPLANE_WAIT_SECS).
    let _worker = c.worker("worker-a");
    tokio::time::sleep(Duration::from_secs(4)).await;
    for id in &ids {
        let t = c.store.get_task(id).await.unwrap().unwrap();
        assert_eq!(t.phase(), TaskPhase::Queued, "taken while suspended");
    }
    assert_eq!(c.depth().await, 3);

    policy.suspend = false;
    c.store.put_policy(policy).await.unwrap();
    for id in &ids {
        assert_eq!(c.wait_terminal(id).await.phase(), TaskPhase::Succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_leads_and_a_restart_loses_no_task() {
    let c = Cluster::new("leader").await;
    let a = c.operator("op-a");
    let b = c.operator("op-b");
    let _worker = c.worker("worker-a");

    // Exactly one of the two leads.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut leader, standby) = loop {
        let la = cluster::samples(&a.metrics_text().await)
            .get("agentplane_operator_leader")
            .copied();
        let lb = cluster::samples(&b.metrics_text().await)
            .get("agentplane_operator_leader")
            .copied();
        match (la, lb) {
            (Some(1.0), Some(0.0)) => break (Some(a), b),
            (Some(0.0), Some(1.0)) => break (Some(b), a),
            (Some(1.0), Some(1.0)) => panic!("two leaders"),
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let d = c.device("kiosk-1").await;
    let mut ids = Vec::new();
    for seq in 1..=30u64 {
        let p = d.intent(seq, "summarize", &format!("task {seq}"));
        ids.push(c.admit(&d, &p).await);
        if seq == 10
            && let Some(l) = leader.take()
        {
            // The leader dies mid-flight; the standby takes over once the Lease expires.
            l.kill().await;
        }
    }
    let mut phases = std::collections::BTreeMap::new();
    for id in &ids {
        *phases
            .entry(c.wait_terminal(id).await.phase().as_str())
            .or_insert(0) += 1;
    }
    assert_eq!(phases.get("Succeeded"), Some(&30), "{phases:?}");
    let m = cluster::samples(&standby.metrics_text().await);
    assert_eq!(m.get("agentplane_operator_leader"), Some(&1.0));

    // A clean stop releases the Lease.
    let status = standby.terminate().await;
    assert!(status.success(), "{status:?}\n{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_over_kubernetes_refuses_bad_devices_and_creates_nothing() {
    let mut c = Cluster::new("gwbad").await;
    let gw = c.start_gateway().await;
    let _operator = c.operator("op-a");
    let _worker = c.worker("worker-a");

    let d = DeviceIdentity::generate("kiosk-1").unwrap();
    assert_eq!(gw.enroll(JOIN_TOKEN, &d, "o").await.unwrap().0, 201);
    let other = DeviceIdentity::generate("kiosk-2").unwrap();
    // The token is spent: a second device cannot use it.
    let e = gw.enroll(JOIN_TOKEN, &other, "o").await;
    assert!(
        matches!(e, Err(ClientError::Api { status, .. }) if status.as_u16() == 403 || status.as_u16() == 401),
        "{e:?}"
    );
    let other = c.device("kiosk-2").await;

    let env = d.sign(&d.intent(5, "summarize", "once")).unwrap();
    let a = gw.submit(&env).await.unwrap();
    let b = gw.submit(&env).await.unwrap();
    assert_eq!(a.task_id, b.task_id);
    assert!(b.duplicate);
    let done = c.wait_terminal(&a.task_id).await;
    assert_eq!(done.phase(), TaskPhase::Succeeded);
    // The other device cannot read it.
    let e = gw.task(&other, &a.task_id).await;
    assert!(
        matches!(e, Err(ClientError::Api { status, .. }) if status.as_u16() == 404 || status.as_u16() == 403),
        "{e:?}"
    );
    let tasks_before = c.task_count().await;

    let expect_4xx =
        |r: Result<agentplane_api::wire::SubmitResponse, ClientError>, code: &str| match r {
            Err(ClientError::Api { status, body }) => {
                assert!(status.is_client_error(), "{status}");
                assert_eq!(body.error.code, code, "{body:?}");
            }
            other => panic!("expected {code}, got {other:?}"),
        };
    // Replayed seq (a new task id under an old seq).
    expect_4xx(
        gw.submit(&d.sign(&d.intent(5, "summarize", "again")).unwrap())
            .await,
        "replayed_seq",
    );
    // Unknown device.
    let ghost = DeviceIdentity::generate("ghost").unwrap();
    expect_4xx(
        gw.submit(&ghost.sign(&ghost.intent(1, "summarize", "boo")).unwrap())
            .await,
        "unknown_device",
    );
    // Tampered payload.
    let mut tampered = d.sign(&d.intent(6, "summarize", "fine")).unwrap();
    let other_payload = d.sign(&d.intent(6, "summarize", "evil")).unwrap();
    tampered.payload = other_payload.payload.clone();
    expect_4xx(gw.submit(&tampered).await, "bad_signature");
    // Expired key.
    let mut spec = c.store.get_device("kiosk-2").await.unwrap().unwrap().spec;
    spec.public_keys[0].not_after = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1),
    ));
    c.store.put_device("kiosk-2", spec.clone()).await.unwrap();
    expect_4xx(
        gw.submit(&other.sign(&other.intent(1, "summarize", "late")).unwrap())
            .await,
        "key_expired",
    );
    // Revoked device.
    spec.public_keys[0].not_after = None;
    spec.revoked = true;
    c.store.put_device("kiosk-2", spec).await.unwrap();
    expect_4xx(
        gw.submit(&other.sign(&other.intent(2, "summarize", "gone")).unwrap())
            .await,
        "device_revoked",
    );

    assert_eq!(c.task_count().await, tasks_before, "nothing created");
    assert_eq!(c.depth().await, 0, "nothing queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cuts_a_burst_exactly_at_the_rate_limit() {
    use agentplane_api::policy::{IntentRule, RateLimit, RateLimitAction, Scope};
    let c = Cluster::new("ratelimit").await;
    let mut policy = cluster::policy();
    policy.intents.push(IntentRule {
        kind: "summarize".into(),
        allowed: true,
        requires_approval: false,
        privacy_levels: vec![],
        rate_limits: vec![RateLimit {
            scope: Scope::Device,
            requests: 3,
            period_seconds: 3600,
        }],
        on_rate_limit: RateLimitAction::Deny,
        tools: vec![],
        max_steps: None,
    });
    c.store.put_policy(policy).await.unwrap();
    // The burst is waiting before the operator starts, so every admission races for the window.
    let d = c.device("kiosk-1").await;
    let mut ids = Vec::new();
    for seq in 1..=8 {
        ids.push(c.admit(&d, &d.intent(seq, "summarize", "burst")).await);
    }
    let _operator = c.operator("op-a");
    let _worker = c.worker("worker-a");
    let (mut ok, mut limited) = (0, 0);
    for id in &ids {
        let t = c.wait_terminal(id).await;
        match t.phase() {
            TaskPhase::Succeeded => ok += 1,
            TaskPhase::Denied => {
                let reason = t.status.reason.unwrap_or_default();
                assert!(reason.contains("rate_limited"), "{reason}");
                assert!(reason.contains("retry after"), "{reason}");
                limited += 1;
            }
            other => panic!("{id} ended {other}"),
        }
    }
    assert_eq!((ok, limited), (3, 5));
}
