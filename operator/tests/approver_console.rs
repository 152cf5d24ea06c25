//! The gateway's approver console (`GET /approvals`) driven in headless Chromium against the real
//! embedded runtime (`agentplane dev`'s, in-process): a wrong token gets a clear refusal, the
//! approver's token lists what waits, Approve makes a task proceed to Succeeded, and Deny denies a
//! plan step with the step named. Debian chromium and playwright-core are peers (`ci/peers.sh
//! chromium`, `ci/peers.sh playwright-core`); without them the test fails with the reason.

use std::path::Path;
use std::time::Duration;

use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::runtime::{Embedded, EmbeddedConfig};
use agentplane::store::{TaskRecord, write_status};
use agentplane_api::TaskPhase;
use agentplane_api::task::{PendingApproval, args_digest};

const JOIN_TOKEN: &str = "join-console";
const APPROVER_TOKEN: &str = "console-approver-secret";

async fn wait_for(rt: &Embedded, id: &str, done: impl Fn(TaskPhase) -> bool) -> TaskRecord {
    for _ in 0..600 {
        let t = rt.store.get_task(id).await.unwrap().unwrap();
        if done(t.phase()) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} did not get there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approver_console_in_headless_chromium_approves_and_denies() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        join_tokens: vec![JOIN_TOKEN.into()],
        gateway: GatewayConfig {
            // The default policy's one approver.
            approvers: vec![ApproverCredential::new("admin", APPROVER_TOKEN)],
            ..GatewayConfig::default()
        },
        resync: Duration::from_millis(500),
        ..EmbeddedConfig::default()
    })
    .await
    .unwrap();
    let client = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-console").unwrap();
    client.enroll(JOIN_TOKEN, &d, "owner").await.unwrap();

    // Two purchases wait for an approver (the default policy's rule).
    let mut ids = Vec::new();
    for (seq, prompt) in [(1, "one coffee"), (2, "clean up old reports")] {
        let t = client
            .submit(&d.sign(&d.intent(seq, "purchase", prompt)).unwrap())
            .await
            .unwrap();
        wait_for(&rt, &t.task_id, |p| p == TaskPhase::AwaitingApproval).await;
        ids.push(t.task_id);
    }
    // The second waits at a plan's tool call instead, written as a worker's plan loop records it
    // (this branch does not run plans yet; the gateway and controller treat it as they would).
    let parked = rt.store.get_task(&ids[1]).await.unwrap().unwrap();
    let arguments = serde_json::json!({"path": "/tmp/old-report"})
        .as_object()
        .unwrap()
        .clone();
    let mut status = parked.status.clone();
    status.pending_approval = Some(PendingApproval {
        step: 3,
        server: "files".into(),
        tool: "delete".into(),
        args_digest: args_digest(&arguments),
        arguments,
        requested_at: None,
    });
    write_status(&*rt.store, &parked, status).await.unwrap();

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("approver-console.png");
    drive(&rt.base_url(), &ids, &shot);

    // What the page said is what the store holds: the approved task ran, the denied one names
    // the step, and each carries the decision the controller accepted.
    let approved = wait_for(&rt, &ids[0], |p| p.is_terminal()).await;
    assert_eq!(
        approved.phase(),
        TaskPhase::Succeeded,
        "{:?}",
        approved.status.reason
    );
    assert_eq!(approved.status.approval.unwrap().approver, "admin");
    let denied = rt.store.get_task(&ids[1]).await.unwrap().unwrap();
    assert_eq!(denied.phase(), TaskPhase::Denied);
    assert_eq!(
        denied.status.reason.as_deref(),
        Some("denied by approver admin at step 3 (files/delete)")
    );
    let decision = denied.status.approval.unwrap();
    assert_eq!(
        (decision.step, decision.comment.as_deref()),
        (Some(3), Some("not that file"))
    );
    rt.stop().await;
}

/// Runs the Playwright script against the page and checks it said it was content.
fn drive(url: &str, ids: &[String], shot: &Path) {
    let _ = std::fs::remove_file(shot);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console-test/approvals.test.mjs");
    let stdout = agentplane_testsupport::run_playwright(
        &script,
        &[
            ("GATEWAY_URL", url.as_ref()),
            ("TOKEN", APPROVER_TOKEN.as_ref()),
            ("TASK_LEVEL", ids[0].as_ref()),
            ("STEP_LEVEL", ids[1].as_ref()),
            ("SCREENSHOT", shot.as_os_str()),
        ],
        "CONSOLE OK",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    eprintln!("{stdout}");
}
