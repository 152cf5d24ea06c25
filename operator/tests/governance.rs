//! Rate limits and budgets over the embedded runtime: tasks go into the store exactly as the gateway
//! puts them there, and the runtime's own controller and worker decide and run them.

use std::time::{Duration, Instant};

use agentplane::client::DeviceIdentity;
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::store::{Admission, NewTask, TaskRecord, TaskStore};
use agentplane_api::TaskPhase;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{
    AgentPolicySpec, Budget, BudgetPeriod, EndpointKind, IntentRule, ModelTier, RateLimit,
    RateLimitAction, Scope,
};
use agentplane_api::task::AgentTaskSpec;

fn config(dir: &std::path::Path, resync: Duration) -> EmbeddedConfig {
    EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        join_tokens: vec!["join".into()],
        resync,
        ..EmbeddedConfig::default()
    }
}

async fn start(dir: &std::path::Path, resync: Duration) -> Embedded {
    Embedded::start(config(dir, resync)).await.unwrap()
}

async fn enroll(store: &dyn TaskStore, name: &str) -> DeviceIdentity {
    let device = DeviceIdentity::generate(name).unwrap();
    store
        .put_device(
            name,
            EdgeDeviceSpec {
                public_keys: vec![device.public_key()],
                owner: "o".into(),
                allowed_intents: vec![],
                revoked: false,
            },
        )
        .await
        .unwrap();
    device
}

/// Stores a signed `summarize` task the way the gateway does; `max_tokens` caps the cost estimate.
async fn submit(
    store: &dyn TaskStore,
    device: &DeviceIdentity,
    seq: u64,
    prompt: &str,
    max_tokens: Option<u64>,
) -> String {
    let mut payload = device.intent(seq, "summarize", prompt);
    if let Some(n) = max_tokens {
        payload
            .intent
            .params
            .insert("maxTokens".into(), serde_json::json!(n));
    }
    let envelope = device.sign(&payload).unwrap();
    let spec = AgentTaskSpec::for_payload(envelope, &payload);
    let new = NewTask {
        id: payload.task_id.clone(),
        spec,
        seq,
        trace_id: None,
    };
    match store.admit(new).await.unwrap() {
        Admission::Created(t) => t.id,
        other => panic!("not created: {other:?}"),
    }
}

async fn wait_until(
    store: &dyn TaskStore,
    id: &str,
    done: impl Fn(&TaskRecord) -> bool,
    within: Duration,
) -> TaskRecord {
    let deadline = Instant::now() + within;
    loop {
        let t = store.get_task(id).await.unwrap().unwrap();
        if done(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} stuck in {} ({:?})",
            t.phase(),
            t.status.reason
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_terminal(store: &dyn TaskStore, id: &str) -> TaskRecord {
    wait_until(
        store,
        id,
        |t| t.phase().is_terminal(),
        Duration::from_secs(20),
    )
    .await
}

fn rule(limits: Vec<RateLimit>, on_rate_limit: RateLimitAction) -> IntentRule {
    IntentRule {
        kind: "summarize".into(),
        allowed: true,
        requires_approval: false,
        privacy_levels: vec![],
        rate_limits: limits,
        on_rate_limit,
        tools: vec![],
        max_steps: None,
    }
}

fn per_device(requests: u32, period_seconds: u32) -> RateLimit {
    RateLimit {
        scope: Scope::Device,
        requests,
        period_seconds,
    }
}

fn rate_limited_policy(limit: RateLimit, action: RateLimitAction) -> AgentPolicySpec {
    let mut p = default_policy();
    p.intents.push(rule(vec![limit], action));
    p
}

/// The `Admitted=True` condition's time, if the task was admitted.
fn admitted_at(t: &TaskRecord) -> Option<jiff::Timestamp> {
    t.status
        .conditions
        .iter()
        .find(|c| c.type_ == "Admitted" && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// The `N` of a reason ending in `retry after Ns`.
fn retry_after_secs(reason: &str) -> u64 {
    let tail = reason
        .rsplit_once("retry after ")
        .unwrap_or_else(|| panic!("no retry-after in {reason:?}"))
        .1;
    tail.trim_end_matches('s').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_rate_limit_is_cut_exactly_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), Duration::from_secs(60)).await;
    rt.store
        .put_policy(rate_limited_policy(
            per_device(5, 60),
            RateLimitAction::Deny,
        ))
        .await
        .unwrap();
    let device = enroll(&*rt.store, "kiosk-1").await;
    let other = enroll(&*rt.store, "kiosk-2").await;

    let mut ids = Vec::new();
    for seq in 1..=20 {
        ids.push(submit(&*rt.store, &device, seq, "burst", None).await);
    }
    let mut succeeded = 0;
    for id in &ids {
        let t = wait_terminal(&*rt.store, id).await;
        match t.phase() {
            TaskPhase::Succeeded => {
                succeeded += 1;
                assert!(admitted_at(&t).is_some(), "admission not recorded: {t:?}");
            }
            TaskPhase::Denied => {
                let reason = t.status.reason.clone().unwrap_or_default();
                assert!(reason.starts_with("rate_limited: "), "{reason}");
                assert!(reason.contains("device \"kiosk-1\""), "{reason}");
                let secs = retry_after_secs(&reason);
                assert!((1..=60).contains(&secs), "{reason}");
                assert!(admitted_at(&t).is_none());
            }
            other => panic!("{id}: {other}"),
        }
    }
    assert_eq!(succeeded, 5, "exactly the limit is admitted");
    // The limit is per device: another device is not affected.
    let id = submit(&*rt.store, &other, 1, "elsewhere", None).await;
    assert_eq!(
        wait_terminal(&*rt.store, &id).await.phase(),
        TaskPhase::Succeeded
    );
    let metrics = rt.metrics.render();
    assert!(
        metrics.contains(
            "agentplane_admission_decisions_total{decision=\"denied\",reason=\"rate_limited\"} 15"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "agentplane_admission_decisions_total{decision=\"admitted\",reason=\"within_policy\"} 6"
        ),
        "{metrics}"
    );
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_wait_for_the_window_then_run() {
    let dir = tempfile::tempdir().unwrap();
    // A resync far in the future: only the controller's requeue timer can bring held tasks back.
    let rt = start(dir.path(), Duration::from_secs(3600)).await;
    rt.store
        .put_policy(rate_limited_policy(per_device(2, 3), RateLimitAction::Hold))
        .await
        .unwrap();
    let device = enroll(&*rt.store, "kiosk-1").await;
    let began = Instant::now();
    let mut ids = Vec::new();
    for seq in 1..=5 {
        ids.push(submit(&*rt.store, &device, seq, "patience", None).await);
    }
    // The first two run at once; the other three are held, Pending, and say why.
    for id in &ids[..2] {
        assert_eq!(
            wait_terminal(&*rt.store, id).await.phase(),
            TaskPhase::Succeeded
        );
    }
    for id in &ids[2..] {
        let t = wait_until(
            &*rt.store,
            id,
            |t| {
                t.status
                    .conditions
                    .iter()
                    .any(|c| c.reason == "RateLimited" && c.status == "False")
            },
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(t.phase(), TaskPhase::Pending, "{:?}", t.status);
    }
    // Then every one of them runs, two per window.
    let mut times = Vec::new();
    for id in &ids {
        let t = wait_terminal(&*rt.store, id).await;
        assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
        times.push(admitted_at(&t).expect("admission recorded"));
    }
    times.sort();
    for w in times.windows(3) {
        // Stored to the second (truncated): a real gap of >= 3 s stays >= 3 s.
        let gap = w[2].duration_since(w[0]);
        assert!(gap >= jiff::SignedDuration::from_secs(3), "{times:?}");
    }
    assert!(
        began.elapsed() >= Duration::from_secs(6),
        "the windows were not waited out"
    );
    let metrics = rt.metrics.render();
    assert!(
        metrics.contains(
            "agentplane_admission_decisions_total{decision=\"held\",reason=\"rate_limited\"}"
        ),
        "{metrics}"
    );
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_rate_window() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), Duration::from_secs(60)).await;
    rt.store
        .put_policy(rate_limited_policy(
            per_device(3, 3600),
            RateLimitAction::Deny,
        ))
        .await
        .unwrap();
    let device = enroll(&*rt.store, "kiosk-1").await;
    for seq in 1..=3 {
        let id = submit(&*rt.store, &device, seq, "before", None).await;
        assert_eq!(
            wait_terminal(&*rt.store, &id).await.phase(),
            TaskPhase::Succeeded
        );
    }
    rt.stop().await;

    let rt = start(dir.path(), Duration::from_secs(60)).await;
    for seq in 4..=5 {
        let id = submit(&*rt.store, &device, seq, "after", None).await;
        let t = wait_terminal(&*rt.store, &id).await;
        assert_eq!(t.phase(), TaskPhase::Denied, "{:?}", t.status.reason);
        let reason = t.status.reason.unwrap_or_default();
        assert!(reason.starts_with("rate_limited: "), "{reason}");
        // Most of the hour is still to wait.
        assert!(retry_after_secs(&reason) > 3000, "{reason}");
    }
    rt.stop().await;
}

fn tier(name: &str, endpoint: &str, per_1k: u64) -> ModelTier {
    ModelTier {
        name: name.into(),
        endpoint_kind: EndpointKind::Builtin,
        endpoint: endpoint.into(),
        model: None,
        price_per_1k_input_micros: per_1k,
        price_per_1k_output_micros: per_1k,
        privacy_levels: vec![],
        gpu: false,
        secret_ref: None,
    }
}

/// Two builtin tiers: `big` (echo, 10 micros a token) over `small` (upper, 1 micro a token). Prompt
/// "a b c d" with maxTokens 5 is estimated at 4 + 5 tokens: 90 on big, 9 on small; echo answers
/// "echo: a b c d" (90 for real), upper "A B C D" (8).
fn budget_policy(scope: Scope, limit_micros: i64) -> AgentPolicySpec {
    let mut p = default_policy();
    p.models = vec![
        tier("big", "builtin:echo", 10_000),
        tier("small", "builtin:upper", 1_000),
    ];
    p.budgets = vec![Budget {
        scope,
        limit_micros,
        period: BudgetPeriod::Month,
    }];
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_runs_out_moves_tasks_down_the_ladder_then_denies() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), Duration::from_secs(60)).await;
    rt.store
        .put_policy(budget_policy(Scope::Device, 100))
        .await
        .unwrap();
    let device = enroll(&*rt.store, "kiosk-1").await;

    // 1. 0 + 90 fits on big; it really costs 90.
    let id = submit(&*rt.store, &device, 1, "a b c d", Some(5)).await;
    let first = wait_terminal(&*rt.store, &id).await;
    assert_eq!(first.phase(), TaskPhase::Succeeded);
    let model = first.status.model.clone().unwrap();
    assert_eq!(
        (model.selected.as_deref(), model.tier),
        (Some("big"), Some(0))
    );
    assert_eq!(first.status.usage.unwrap().cost_micros, 90);
    assert_eq!(first.status.result.as_deref(), Some("echo: a b c d"));

    // 2. 90 + 90 does not fit; 90 + 9 on small does. Status shows the move and why.
    let id = submit(&*rt.store, &device, 2, "a b c d", Some(5)).await;
    let second = wait_terminal(&*rt.store, &id).await;
    assert_eq!(second.phase(), TaskPhase::Succeeded);
    let model = second.status.model.clone().unwrap();
    assert_eq!(
        (model.selected.as_deref(), model.tier, model.requested),
        (Some("small"), Some(1), None)
    );
    assert_eq!(second.status.result.as_deref(), Some("A B C D"));
    assert_eq!(second.status.usage.unwrap().cost_micros, 8);
    let cond = second
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Admitted")
        .unwrap();
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("True", "ModelDowngraded")
    );
    assert!(
        cond.message.contains("from \"big\" to \"small\""),
        "{}",
        cond.message
    );
    assert!(
        cond.message.contains("device \"kiosk-1\""),
        "{}",
        cond.message
    );

    // 3. 98 spent: neither 98 + 90 nor 98 + 9 fits. Denied, naming the budget.
    let id = submit(&*rt.store, &device, 3, "a b c d", Some(5)).await;
    let third = wait_terminal(&*rt.store, &id).await;
    assert_eq!(third.phase(), TaskPhase::Denied);
    let reason = third.status.reason.unwrap_or_default();
    assert!(reason.starts_with("budget_exhausted: "), "{reason}");
    assert!(reason.contains("100 micros per month"), "{reason}");
    assert!(reason.contains("has 98 spent"), "{reason}");
    let metrics = rt.metrics.render();
    assert!(
        metrics.contains(
            "agentplane_admission_decisions_total{decision=\"admitted\",reason=\"downgraded\"} 1"
        ),
        "{metrics}"
    );
    rt.stop().await;

    // The spend survives a restart: still denied.
    let rt = start(dir.path(), Duration::from_secs(60)).await;
    let id = submit(&*rt.store, &device, 4, "a b c d", Some(5)).await;
    let fourth = wait_terminal(&*rt.store, &id).await;
    assert_eq!(fourth.phase(), TaskPhase::Denied);
    let reason = fourth.status.reason.unwrap_or_default();
    assert!(reason.contains("has 98 spent"), "{reason}");
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_in_flight_count_against_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), Duration::from_secs(60)).await;
    rt.store
        .put_policy(budget_policy(Scope::Namespace, 100))
        .await
        .unwrap();
    let a = enroll(&*rt.store, "kiosk-1").await;
    let b = enroll(&*rt.store, "kiosk-2").await;
    // Submitted together, before anything is billed: the first reserves 90 on big, the second fits
    // only on small (99), the third nowhere, whichever device sent it.
    let ids = [
        submit(&*rt.store, &a, 1, "a b c d", Some(5)).await,
        submit(&*rt.store, &b, 1, "a b c d", Some(5)).await,
        submit(&*rt.store, &a, 2, "a b c d", Some(5)).await,
    ];
    let mut outcomes = Vec::new();
    for id in &ids {
        let t = wait_terminal(&*rt.store, id).await;
        outcomes.push(match t.phase() {
            TaskPhase::Succeeded => t.status.model.unwrap().selected.unwrap(),
            TaskPhase::Denied => t
                .status
                .reason
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned(),
            other => panic!("{other}"),
        });
    }
    assert_eq!(outcomes, ["big", "small", "budget_exhausted"]);
    rt.stop().await;
}
