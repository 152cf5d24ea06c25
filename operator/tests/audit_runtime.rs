//! The audit log wired into both runtimes: `agentplane dev`'s embedded runtime (every store write
//! recorded, Ed25519 checkpoints, a restart that keeps the log consistent) and the distributed
//! operator leader (every state it observes, KMS ECC_NIST_P256 checkpoints on moto), each checked
//! afterwards with the `agentplane audit` binary, offline, with the signer's public key pinned.

mod cluster;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentplane::audit::checkpoint::TrustedKey;
use agentplane::audit::merkle::verify_consistency;
use agentplane::audit::verify::ConsistencyProof;
use agentplane::audit::{AuditEvent, EventKind, SignedCheckpoint};
use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::runtime::{Embedded, EmbeddedConfig};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use agentplane_api::task::ApprovalDecision;
use agentplane_api::wire::TaskView;
use cluster::{APPROVER, APPROVER_TOKEN, Cluster, JOIN_TOKEN};

const DEV_APPROVER_TOKEN: &str = "dev-approver-secret";

/// Runs `agentplane audit ...`; returns (exit code, stdout, stderr).
fn audit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentplane"))
        .arg("audit")
        .args(args)
        .output()
        .expect("running agentplane audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `agentplane audit verify`, which must pass with every leaf covered by a signed checkpoint.
fn verify_passes(log: &Path, extra: &[&str]) -> String {
    let mut args = vec!["verify", "--log", path_str(log)];
    args.extend_from_slice(extra);
    let (code, out, err) = audit(&args);
    assert_eq!(code, 0, "audit verify failed:\n{out}\n{err}");
    assert!(out.starts_with("OK: "), "{out}");
    assert!(
        out.contains("; 0 leaves not yet covered by a checkpoint"),
        "the stop should have signed the tail: {out}"
    );
    assert!(
        !out.contains("warning: signatures were checked against the keys recorded in the log"),
        "the signer was pinned: {out}"
    );
    out
}

/// Every leaf, via `agentplane audit export`.
fn export(log: &Path) -> Vec<AuditEvent> {
    let (code, out, err) = audit(&["export", "--log", path_str(log)]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| AuditEvent::from_leaf(l.as_bytes()).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The latest checkpoint, via `agentplane audit checkpoint`, saved to `to` for `--trusted-checkpoint`.
fn save_checkpoint(log: &Path, to: &Path) -> SignedCheckpoint {
    let (code, out, err) = audit(&["checkpoint", "--log", path_str(log)]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(to, &out).unwrap();
    serde_json::from_str(&out).unwrap()
}

/// Checks the consistency proof `agentplane audit consistency` prints from `old` to the latest
/// checkpoint, and returns the latest.
fn consistent_since(log: &Path, old: &SignedCheckpoint) -> SignedCheckpoint {
    let size = old.size.to_string();
    let (code, out, err) = audit(&["consistency", "--log", path_str(log), "--from", &size]);
    assert_eq!(code, 0, "{out}\n{err}");
    let proof: ConsistencyProof = serde_json::from_str(&out).unwrap();
    assert_eq!(
        &proof.old, old,
        "the old end is the checkpoint saved earlier"
    );
    assert!(proof.new.size > old.size, "{out}");
    verify_consistency(
        old.size,
        proof.new.size,
        &old.root,
        &proof.new.root,
        &proof.proof,
    )
    .expect("the log after the restart extends the one before");
    proof.new
}

/// (kind, from, to, actor) of a task's events, in log order.
type Step = (
    EventKind,
    Option<TaskPhase>,
    Option<TaskPhase>,
    Option<String>,
);

fn steps(events: &[AuditEvent], task: &str) -> Vec<Step> {
    events
        .iter()
        .filter(|e| e.task == task)
        .map(|e| (e.kind, e.from, e.to, e.actor.clone()))
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    cluster::samples(text)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Embedded runtime
// ---------------------------------------------------------------------------------------------

fn dev_config(data: &Path) -> EmbeddedConfig {
    EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.to_path_buf(),
        join_tokens: vec!["join-audit".into()],
        gateway: GatewayConfig {
            approvers: vec![ApproverCredential::new("admin", DEV_APPROVER_TOKEN)],
            sse_poll: Duration::from_millis(100),
            ..GatewayConfig::default()
        },
        worker: WorkerConfig {
            concurrency: 2,
            wait: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
        resync: Duration::from_millis(200),
        ..EmbeddedConfig::default()
    }
}

async fn wait_view(
    gw: &GatewayClient,
    d: &DeviceIdentity,
    id: &str,
    done: impl Fn(TaskPhase) -> bool,
) -> TaskView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = gw.task(d, id).await.unwrap();
        if done(v.phase) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} stuck in {}",
            v.phase
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit(gw: &GatewayClient, d: &DeviceIdentity, seq: u64, kind: &str) -> String {
    gw.submit(&d.sign(&d.intent(seq, kind, "audited")).unwrap())
        .await
        .unwrap()
        .task_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_runtime_audits_every_transition_across_a_restart() {
    use TaskPhase::*;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = data.join("audit.sqlite");

    let rt = Embedded::start(dev_config(&data)).await.unwrap();
    assert!(rt.audit.is_some(), "audit is on by default");
    let gw = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-1").unwrap();
    gw.enroll("join-audit", &d, "owner").await.unwrap();

    // Runs to the end.
    let ok = submit(&gw, &d, 1, "summarize").await;
    assert_eq!(gw.follow(&d, &ok, |_| {}).await.unwrap().phase, Succeeded);
    // Approved by a named approver.
    let approved = submit(&gw, &d, 2, "purchase").await;
    wait_view(&gw, &d, &approved, |p| p == AwaitingApproval).await;
    gw.decide(DEV_APPROVER_TOKEN, &approved, true, Some("fine"))
        .await
        .unwrap();
    assert_eq!(
        gw.follow(&d, &approved, |_| {}).await.unwrap().phase,
        Succeeded
    );
    // Refused by the approver.
    let refused = submit(&gw, &d, 3, "purchase").await;
    wait_view(&gw, &d, &refused, |p| p == AwaitingApproval).await;
    gw.decide(DEV_APPROVER_TOKEN, &refused, false, Some("too dear"))
        .await
        .unwrap();
    assert_eq!(gw.follow(&d, &refused, |_| {}).await.unwrap().phase, Denied);
    // Refused by policy.
    let shell = submit(&gw, &d, 4, "shell").await;
    assert_eq!(gw.follow(&d, &shell, |_| {}).await.unwrap().phase, Denied);
    // Cancelled by the device while it waits for an approver.
    let cancelled = submit(&gw, &d, 5, "purchase").await;
    wait_view(&gw, &d, &cancelled, |p| p == AwaitingApproval).await;
    gw.cancel(&d, &cancelled).await.unwrap();
    assert_eq!(
        gw.follow(&d, &cancelled, |_| {}).await.unwrap().phase,
        Cancelled
    );

    // A client sees a phase once it committed, a moment before its leaf is appended: read the
    // metrics once the runtime has stopped (and every write has been recorded).
    let metrics = rt.metrics.clone();
    rt.stop().await;
    let text = metrics.render();

    // Offline, with the dev key's public half pinned.
    let (code, pem, err) = audit(&[
        "public-key",
        "--key-file",
        path_str(&data.join("audit.key")),
    ]);
    assert_eq!(code, 0, "{err}");
    let pem_path = dir.path().join("dev.pem");
    std::fs::write(&pem_path, &pem).unwrap();
    verify_passes(&log, &["--public-key", path_str(&pem_path)]);

    let events = export(&log);
    let size = events.len() as u64;
    assert_eq!(size, 4 + 6 + 4 + 2 + 4, "{events:#?}");
    assert_eq!(metric(&text, "agentplane_audit_log_size"), size as f64);
    assert_eq!(metric(&text, "agentplane_audit_appends_total"), size as f64);
    assert!(
        metric(&text, "agentplane_audit_checkpoints_total") >= 1.0,
        "{text}"
    );
    assert_eq!(
        cluster::samples(&text).get("agentplane_audit_append_failures_total"),
        None,
        "no append failed"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64);
        assert_eq!(e.namespace, "default");
    }
    let device = Some("device/kiosk-1".to_owned());
    let admin = Some("admin".to_owned());
    assert_eq!(
        steps(&events, &ok),
        vec![
            (EventKind::Admission, None, Some(Pending), device.clone()),
            (EventKind::Decision, Some(Pending), Some(Queued), None),
            (EventKind::Transition, Some(Queued), Some(Running), None),
            (EventKind::Transition, Some(Running), Some(Succeeded), None),
        ]
    );
    assert_eq!(
        steps(&events, &approved),
        vec![
            (EventKind::Admission, None, Some(Pending), device.clone()),
            (
                EventKind::Decision,
                Some(Pending),
                Some(AwaitingApproval),
                None
            ),
            // The controller accepts the decision in the write that moves the task.
            (
                EventKind::Approval,
                Some(AwaitingApproval),
                Some(Queued),
                admin.clone()
            ),
            (
                EventKind::Transition,
                Some(AwaitingApproval),
                Some(Queued),
                None
            ),
            (EventKind::Transition, Some(Queued), Some(Running), None),
            (EventKind::Transition, Some(Running), Some(Succeeded), None),
        ]
    );
    assert_eq!(
        steps(&events, &refused),
        vec![
            (EventKind::Admission, None, Some(Pending), device.clone()),
            (
                EventKind::Decision,
                Some(Pending),
                Some(AwaitingApproval),
                None
            ),
            // The controller accepts the decision in the write that moves the task.
            (
                EventKind::Approval,
                Some(AwaitingApproval),
                Some(Denied),
                admin.clone()
            ),
            (
                EventKind::Transition,
                Some(AwaitingApproval),
                Some(Denied),
                None
            ),
        ]
    );
    assert_eq!(
        steps(&events, &shell),
        vec![
            (EventKind::Admission, None, Some(Pending), device.clone()),
            (EventKind::Decision, Some(Pending), Some(Denied), None),
        ]
    );
    assert_eq!(
        steps(&events, &cancelled),
        vec![
            (EventKind::Admission, None, Some(Pending), device.clone()),
            (
                EventKind::Decision,
                Some(Pending),
                Some(AwaitingApproval),
                None
            ),
            (EventKind::Decision, Some(AwaitingApproval), None, None),
            (
                EventKind::Transition,
                Some(AwaitingApproval),
                Some(Cancelled),
                None
            ),
        ]
    );
    // What the approvals and the denial say.
    let approval = |task: &str| {
        events
            .iter()
            .find(|e| e.task == task && e.kind == EventKind::Approval)
            .unwrap()
            .clone()
    };
    assert_eq!(approval(&approved).reason.as_deref(), Some("fine"));
    assert_eq!(approval(&approved).details["decision"], "Approved");
    assert_eq!(approval(&refused).reason.as_deref(), Some("too dear"));
    assert_eq!(approval(&refused).details["decision"], "Denied");
    let shell_denial = events
        .iter()
        .find(|e| e.task == shell && e.to == Some(Denied))
        .unwrap();
    assert!(
        shell_denial
            .reason
            .as_deref()
            .unwrap()
            .starts_with("intent_not_allowed"),
        "{shell_denial:?}"
    );
    let done = events
        .iter()
        .find(|e| e.task == ok && e.to == Some(Succeeded))
        .unwrap();
    assert!(done.details["usage"]["costMicros"].as_u64().unwrap() > 0);

    // Restart on the same data directory: the same key signs, the log grows, and the history before
    // the restart is provably a prefix of the one after.
    let before = save_checkpoint(&log, &dir.path().join("before.json"));
    assert_eq!(before.size, size);
    let rt = Embedded::start(dev_config(&data)).await.unwrap();
    let gw = GatewayClient::new(&rt.base_url());
    let later = submit(&gw, &d, 6, "summarize").await;
    assert_eq!(
        gw.follow(&d, &later, |_| {}).await.unwrap().phase,
        Succeeded
    );
    rt.stop().await;

    verify_passes(
        &log,
        &[
            "--public-key",
            path_str(&pem_path),
            "--trusted-checkpoint",
            path_str(&dir.path().join("before.json")),
        ],
    );
    let after = consistent_since(&log, &before);
    assert_eq!(after.key_id, before.key_id, "the key file was reused");
    let events = export(&log);
    assert_eq!(events.len() as u64, after.size);
    assert_eq!(
        steps(&events, &later).len(),
        4,
        "{:?}",
        steps(&events, &later)
    );
    assert!(
        events
            .iter()
            .filter(|e| e.task == later)
            .all(|e| e.seq >= before.size),
        "new events only after the old tree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_runtime_can_run_without_an_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(EmbeddedConfig {
        audit: false,
        ..dev_config(dir.path())
    })
    .await
    .unwrap();
    assert!(rt.audit.is_none());
    rt.stop().await;
    assert!(!dir.path().join("audit.sqlite").exists());
    assert!(!dir.path().join("audit.key").exists());
}

// ---------------------------------------------------------------------------------------------
// Distributed: the operator leader, KMS ECC_NIST_P256 on moto
// ---------------------------------------------------------------------------------------------

/// Waits until the log (read while the operator still has it open) holds `want` for every task.
async fn wait_recorded(c: &Cluster, log: &Path, want: &[(String, TaskPhase)]) -> Vec<AuditEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = if log.exists() {
            export(log)
        } else {
            Vec::new()
        };
        let missing: Vec<_> = want
            .iter()
            .filter(|(task, phase)| {
                !events
                    .iter()
                    .any(|e| &e.task == task && e.to == Some(*phase))
            })
            .collect();
        if missing.is_empty() {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recorded: {missing:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn count(events: &[AuditEvent], task: &str, kind: EventKind) -> usize {
    events
        .iter()
        .filter(|e| e.task == task && e.kind == kind)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_leader_audits_with_a_kms_key_across_a_restart() {
    use TaskPhase::*;
    use aws_sdk_kms::types::{KeySpec, KeyUsageType};

    let mut c = Cluster::new("audit").await;
    let kms = aws_sdk_kms::Client::new(&c.stack.aws_sdk_config().await);
    let key_id = kms
        .create_key()
        .key_spec(KeySpec::EccNistP256)
        .key_usage(KeyUsageType::SignVerify)
        .description(format!("audit-{}", c.namespace))
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    let der = kms
        .get_public_key()
        .key_id(&key_id)
        .send()
        .await
        .unwrap()
        .public_key
        .unwrap();
    let kms_key = TrustedKey::from_spki_der(der.as_ref()).unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    let pem_path = audit_dir.path().join("kms.pem");
    std::fs::write(&pem_path, kms_key.to_pem()).unwrap();
    let log: PathBuf = audit_dir.path().join("state/audit.sqlite");

    // Only the operator reads these; the gateway and workers record nothing themselves. The
    // origin is a replica's own, as the chart sets it (`.../<namespace>/<pod name>`); both
    // operators below stand for that one replica restarted.
    let origin = format!("agentplane.dev/audit/{}/agentplane-operator-0", c.namespace);
    c.env
        .push(("AGENTPLANE_AUDIT_LOG".into(), path_str(&log).into()));
    c.env
        .push(("AGENTPLANE_AUDIT_KMS_KEY_ID".into(), key_id.clone()));
    c.env
        .push(("AGENTPLANE_AUDIT_ORIGIN".into(), origin.clone()));
    let gw = c.start_gateway().await;
    let operator = c.operator("op-audit-a");
    let _worker = c.worker("worker-audit");

    let d = DeviceIdentity::generate("kiosk-audit").unwrap();
    gw.enroll(JOIN_TOKEN, &d, "owner").await.unwrap();
    let ok = submit(&gw, &d, 1, "summarize").await;
    let shell = submit(&gw, &d, 2, "shell").await;
    let approved = submit(&gw, &d, 3, "purchase").await;
    let refused = submit(&gw, &d, 4, "purchase").await;
    let cancelled = submit(&gw, &d, 5, "purchase").await;
    for id in [&approved, &refused, &cancelled] {
        c.wait_phase(id, |p| p == AwaitingApproval, Duration::from_secs(60))
            .await;
    }
    gw.decide(APPROVER_TOKEN, &approved, true, Some("ok"))
        .await
        .unwrap();
    gw.decide(APPROVER_TOKEN, &refused, false, Some("no"))
        .await
        .unwrap();
    gw.cancel(&d, &cancelled).await.unwrap();
    let expected = [
        (ok.clone(), Succeeded),
        (shell.clone(), Denied),
        (approved.clone(), Succeeded),
        (refused.clone(), Denied),
        (cancelled.clone(), Cancelled),
    ];
    for (id, phase) in &expected {
        let t = c.wait_terminal(id).await;
        assert_eq!(t.phase(), *phase, "{id}: {:?}", t.status.reason);
    }
    wait_recorded(&c, &log, &expected).await;
    let text = operator.metrics_text().await;
    assert!(
        metric(&text, "agentplane_audit_appends_total") >= 15.0,
        "{text}"
    );
    assert!(metric(&text, "agentplane_audit_log_size") >= 15.0, "{text}");
    let status = operator.terminate().await;
    assert!(status.success(), "operator exit: {status:?}\n{}", c.logs());

    let out = verify_passes(&log, &["--public-key", path_str(&pem_path)]);
    assert!(out.contains(&format!("origin: {origin}\n")), "{out}");
    let events = export(&log);
    // What the leader's log guarantees, whatever the watch coalesced: the admission, the policy
    // decisions, approvals with the approver, the cancel request and the terminal phase.
    for (id, phase) in &expected {
        assert_eq!(count(&events, id, EventKind::Admission), 1, "{id}");
        let last = events.iter().rfind(|e| &e.task == id).unwrap();
        assert_eq!(last.to, Some(*phase), "{id}: the terminal phase is last");
    }
    let decided = |id: &str, to: TaskPhase| {
        events
            .iter()
            .any(|e| e.task == id && e.kind == EventKind::Decision && e.to == Some(to))
    };
    assert!(decided(&ok, Queued), "the admission verdict is recorded");
    assert!(decided(&shell, Denied));
    for id in [&approved, &refused, &cancelled] {
        assert!(decided(id, AwaitingApproval), "{id}");
    }
    for (id, decision) in [
        (&approved, ApprovalDecision::Approved),
        (&refused, ApprovalDecision::Denied),
    ] {
        let a = events
            .iter()
            .find(|e| &e.task == id && e.kind == EventKind::Approval)
            .unwrap_or_else(|| panic!("no approval for {id}"));
        assert_eq!(a.actor.as_deref(), Some(APPROVER));
        assert_eq!(a.details["decision"], serde_json::json!(decision));
    }
    assert!(
        events.iter().any(|e| e.task == cancelled
            && e.kind == EventKind::Decision
            && e.reason.as_deref() == Some("cancel requested")),
        "the cancel request is recorded"
    );

    // A new leader on the same log: it re-lists every task (adding nothing for states already
    // recorded), records the new task, and its checkpoints extend the earlier ones.
    let before = save_checkpoint(&log, &audit_dir.path().join("before.json"));
    assert_eq!(
        before.origin, origin,
        "the checkpoint names the replica's log"
    );
    let operator = c.operator("op-audit-b");
    let later = submit(&gw, &d, 6, "summarize").await;
    assert_eq!(c.wait_terminal(&later).await.phase(), Succeeded);
    wait_recorded(&c, &log, &[(later.clone(), Succeeded)]).await;
    let status = operator.terminate().await;
    assert!(status.success(), "operator exit: {status:?}\n{}", c.logs());
    verify_passes(
        &log,
        &[
            "--public-key",
            path_str(&pem_path),
            "--trusted-checkpoint",
            path_str(&audit_dir.path().join("before.json")),
        ],
    );
    let after = consistent_since(&log, &before);
    assert_eq!(after.key_id, kms_key.key_id(), "signed by the KMS key");
    assert_eq!(after.origin, origin);
    let events = export(&log);
    for (id, _) in &expected {
        assert_eq!(
            count(&events, id, EventKind::Admission),
            1,
            "{id} was not recorded again by the new leader"
        );
    }
    assert!(
        events
            .iter()
            .filter(|e| e.task == later)
            .all(|e| e.seq >= before.size)
    );
}

/// A bad `AGENTPLANE_AUDIT_ORIGIN` (empty, a newline that would forge a line of the signed
/// checkpoint body, too long) stops the operator before it connects to anything or creates the
/// log, with a message naming the setting. No stack needed: it never gets that far.
#[test]
fn the_operator_refuses_a_bad_audit_origin() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.sqlite");
    let long = format!("agentplane.dev/audit/{}", "x".repeat(300));
    for origin in [
        "",
        "agentplane.dev/audit/team-a\n1000000",
        "agentplane.dev/audit/\u{7}bell",
        long.as_str(),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agentplane"))
            .arg("operator")
            .env("AGENTPLANE_NAMESPACE", "team-a")
            .env("AGENTPLANE_QUEUE_URL", "http://127.0.0.1:9/queue")
            .env("AGENTPLANE_AUDIT_LOG", &log)
            .env("AGENTPLANE_AUDIT_ORIGIN", origin)
            .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
            .output()
            .expect("running agentplane operator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{origin:?} accepted:\n{stderr}");
        assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
        assert!(
            stderr.contains("AGENTPLANE_AUDIT_ORIGIN") && stderr.contains("--audit-origin"),
            "{origin:?}: {stderr}"
        );
        assert!(!log.exists(), "{origin:?}: the log must not be created");
    }
}
