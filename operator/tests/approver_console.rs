//! The gateway's approver console (`GET /approvals`) driven in headless Chromium against the real
//! embedded runtime (`agentplane dev`'s, in-process): a wrong token gets a clear refusal, the
//! approver's token lists what waits, Approve makes a task proceed to Succeeded, and both kinds of
//! wait are decided in the page: a task-level one (the intent rule asks for approval) and two real
//! plans parked by the worker's plan loop at a `requiresApproval` tool step, one approved (the call
//! then runs once, with its step key) and one denied (the task ends Denied naming the step).
//!
//! Peers: Debian chromium and playwright-core (`ci/peers.sh chromium`, `ci/peers.sh
//! playwright-core`), and the Python MCP SDK (`ci/peers.sh mcp-python`) running the tool server
//! `ci/mcp/recorder.py`, which logs every call it receives with its idempotency key; without them
//! the test fails with the reason. No LLM runs on this machine, so the plans' model is the scripted
//! endpoint (`scripted_model`), speaking the exact OpenAI chat-completions tool-call format.

use std::path::Path;
use std::time::Duration;

mod mcp_peers;
mod scripted_model;

use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::store::TaskRecord;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{AgentPolicySpec, EndpointKind, IntentRule, RateLimitAction};
use agentplane_api::task::StepOutcome;
use mcp_peers::{recorded, recorder_server, tool};
use scripted_model::{ModelServer, Scripted};
use serde_json::{Value, json};

const JOIN_TOKEN: &str = "join-console";
const APPROVER_TOKEN: &str = "console-approver-secret";
/// The intent whose rule offers the recorder's tools (so its tasks run as plans).
const PLAN_INTENT: &str = "tidy";

async fn wait_for(rt: &Embedded, id: &str, done: impl Fn(TaskPhase) -> bool) -> TaskRecord {
    for _ in 0..600 {
        let t = rt.store.get_task(id).await.unwrap().unwrap();
        if done(t.phase()) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = rt.store.get_task(id).await.unwrap().unwrap();
    panic!(
        "task {id} did not get there: {} {:?}",
        t.phase(),
        t.status.reason
    );
}

/// The default policy (`purchase` needs approval, `admin` approves, the builtin tier first) plus a
/// plan intent on the scripted tier whose `delete_record` needs an approver.
fn policy(model: &ModelServer, log: &Path) -> AgentPolicySpec {
    let mut p = default_policy();
    p.models
        .push(scripted_model::tier(EndpointKind::Openai, &model.base));
    p.intents.push(IntentRule {
        kind: PLAN_INTENT.into(),
        allowed: true,
        requires_approval: false,
        privacy_levels: vec![],
        rate_limits: vec![],
        on_rate_limit: RateLimitAction::Deny,
        tools: vec![
            tool("rec", "write_record", false),
            tool("rec", "delete_record", true),
        ],
        max_steps: None,
    });
    p.mcp_servers = vec![recorder_server(log)];
    p
}

/// (tool, idempotency key, duplicate) of every call the recorder saw for task `id`.
fn calls_of(log: &Path, id: &str) -> Vec<(String, String, bool)> {
    recorded(log)
        .into_iter()
        .filter(|c| c.key.starts_with(&format!("{id}/")))
        .map(|c| (c.tool, c.key, c.duplicate))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approver_console_in_headless_chromium_decides_a_task_and_two_real_plan_steps() {
    // Each plan writes a record (step 2), then asks to delete it (step 4, needs an approver),
    // then answers with the tool results.
    let model = ModelServer::start(vec![
        Scripted::Calls(vec![(
            "rec__write_record",
            json!({"key": "report", "value": "old"}),
        )]),
        Scripted::Calls(vec![("rec__delete_record", json!({"key": "report"}))]),
        Scripted::Answer,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("calls.jsonl");
    scripted_model::write_key(&data);
    let rt = Embedded::start(EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data,
        join_tokens: vec![JOIN_TOKEN.into()],
        gateway: GatewayConfig {
            // The default policy's one approver.
            approvers: vec![ApproverCredential::new("admin", APPROVER_TOKEN)],
            ..GatewayConfig::default()
        },
        resync: Duration::from_millis(500),
        initial_policy: Some(policy(&model, &log)),
        ..EmbeddedConfig::default()
    })
    .await
    .unwrap();
    let client = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-console").unwrap();
    client.enroll(JOIN_TOKEN, &d, "owner").await.unwrap();

    // A purchase waits as a whole (its rule); two plans wait at their step 4.
    let mut ids = Vec::new();
    for (seq, kind, prompt) in [
        (1, "purchase", "one coffee"),
        (2, PLAN_INTENT, "clean up the old report"),
        (3, PLAN_INTENT, "clean up the old report again"),
    ] {
        let mut payload = d.intent(seq, kind, prompt);
        if kind == PLAN_INTENT {
            payload.required_resources.model = Some(scripted_model::TIER.into());
        }
        let t = client.submit(&d.sign(&payload).unwrap()).await.unwrap();
        wait_for(&rt, &t.task_id, |p| {
            p == TaskPhase::AwaitingApproval || p.is_terminal()
        })
        .await;
        ids.push(t.task_id);
    }
    let (task_level, approve, deny) = (&ids[0], &ids[1], &ids[2]);
    for id in [approve, deny] {
        let t = rt.store.get_task(id).await.unwrap().unwrap();
        assert_eq!(
            t.phase(),
            TaskPhase::AwaitingApproval,
            "{:?}",
            t.status.reason
        );
        let p = t.status.pending_approval.unwrap();
        assert_eq!(
            (p.step, p.server.as_str(), p.tool.as_str()),
            (4, "rec", "delete_record")
        );
        assert_eq!(Value::Object(p.arguments), json!({"key": "report"}));
        // The write ran; the delete did not, while it waits.
        assert_eq!(
            calls_of(&log, id),
            vec![("write_record".into(), format!("{id}/tool/2"), false)]
        );
    }

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("approver-console.png");
    let url = rt.base_url();
    let (a, b, c) = (task_level.clone(), approve.clone(), deny.clone());
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || drive(&url, &a, &b, &c, &shot)
    })
    .await
    .unwrap();

    // What the page said is what the store holds, and what the tool server saw.
    let done = wait_for(&rt, task_level, |p| p.is_terminal()).await;
    assert_eq!(
        done.phase(),
        TaskPhase::Succeeded,
        "{:?}",
        done.status.reason
    );
    assert_eq!(done.status.approval.unwrap().approver, "admin");

    // The approved plan ran the approved call exactly once, under its step's key, and finished.
    let ran = wait_for(&rt, approve, |p| p.is_terminal()).await;
    assert_eq!(ran.phase(), TaskPhase::Succeeded, "{:?}", ran.status.reason);
    assert_eq!(
        ran.status.result.as_deref(),
        Some("results: stored report=old | deleted report")
    );
    assert_eq!(
        calls_of(&log, approve),
        vec![
            ("write_record".into(), format!("{approve}/tool/2"), false),
            ("delete_record".into(), format!("{approve}/tool/4"), false)
        ]
    );
    let approval = ran.status.approval.unwrap();
    assert_eq!(
        (approval.approver.as_str(), approval.step),
        ("admin", Some(4))
    );
    assert!(ran.status.pending_approval.is_none());
    assert!(
        ran.status
            .steps
            .iter()
            .all(|s| s.outcome == StepOutcome::Done),
        "{:?}",
        ran.status.steps
    );

    // The denied plan names the step and never ran the call.
    let denied = wait_for(&rt, deny, |p| p.is_terminal()).await;
    assert_eq!(denied.phase(), TaskPhase::Denied);
    assert_eq!(
        denied.status.reason.as_deref(),
        Some("denied by approver admin at step 4 (rec/delete_record)")
    );
    let decision = denied.status.approval.unwrap();
    assert_eq!(
        (decision.step, decision.comment.as_deref()),
        (Some(4), Some("not that record"))
    );
    assert_eq!(
        calls_of(&log, deny),
        vec![("write_record".into(), format!("{deny}/tool/2"), false)]
    );
    // Three calls in all: the two writes and the one approved delete.
    assert_eq!(recorded(&log).len(), 3, "{:?}", recorded(&log));
    rt.stop().await;
}

/// Runs the Playwright script against the page and checks it said it was content.
fn drive(url: &str, task_level: &str, approve: &str, deny: &str, shot: &Path) {
    let _ = std::fs::remove_file(shot);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console-test/approvals.test.mjs");
    let stdout = agentplane_testsupport::run_playwright(
        &script,
        &[
            ("GATEWAY_URL", url.as_ref()),
            ("TOKEN", APPROVER_TOKEN.as_ref()),
            ("TASK_LEVEL", task_level.as_ref()),
            ("STEP_APPROVE", approve.as_ref()),
            ("STEP_DENY", deny.as_ref()),
            ("STEP_CALL", "step 4: rec/delete_record".as_ref()),
            ("STEP_ARGUMENT", "\"key\": \"report\"".as_ref()),
            ("SCREENSHOT", shot.as_os_str()),
        ],
        "CONSOLE OK",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("{stdout}");
}
