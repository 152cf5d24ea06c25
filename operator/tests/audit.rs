//! The tamper-evident audit log end to end: real SQLite files edited the way an attacker would, the
//! `agentplane audit` binary, KMS P-256 signing against moto verified offline with p256, and the
//! audited task store over the embedded SQLite store.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agentplane::audit::checkpoint::{CheckpointSigner, Ed25519Signer, KmsSigner, TrustedKey};
use agentplane::audit::merkle::{self, verify_consistency, verify_inclusion};
use agentplane::audit::verify::{InclusionProof, Problem, VerifyError, VerifyOptions, verify_log};
use agentplane::audit::{
    AuditEvent, AuditLog, AuditLogConfig, AuditedStore, EventKind, SignedCheckpoint,
};
use agentplane::store::sqlite::{Db, SqliteStore};
use agentplane::store::{Admission, NewTask, StoreError, TaskStore};
use agentplane_api::device::{EdgeDeviceSpec, KeyAlgorithm, PublicKey};
use agentplane_api::intent::{PrivacyLevel, RequiredResources};
use agentplane_api::task::{AgentTaskSpec, Approval, ApprovalDecision, DeviceRef};
use agentplane_api::{Envelope, EnvelopeSignature, TaskPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rusqlite::Connection;

const ORIGIN: &str = "agentplane.dev/audit/test";

fn key_a() -> Arc<Ed25519Signer> {
    Arc::new(Ed25519Signer::from_seed([0xa; 32]))
}

fn key_b() -> Arc<Ed25519Signer> {
    Arc::new(Ed25519Signer::from_seed([0xb; 32]))
}

fn config(path: &Path) -> AuditLogConfig {
    let mut c = AuditLogConfig::new(path, ORIGIN);
    // The tests sign explicitly, at known sizes.
    c.checkpoint_every = u64::MAX;
    c.checkpoint_interval = Duration::from_secs(3600);
    c
}

fn event(i: u64, variant: &str) -> AuditEvent {
    let mut e = AuditEvent::new(EventKind::Transition, "default", &format!("task-{i}"));
    e.from = Some(TaskPhase::Queued);
    e.to = Some(TaskPhase::Running);
    e.reason = Some(format!("{variant} step {i}"));
    // Fixed times: two logs built from the same steps hold the same leaves.
    e.at = jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap();
    e
}

/// Appends leaves `from..to` (event text `variant`), signing a checkpoint after every 10th.
async fn fill(log: &AuditLog, from: u64, to: u64, variant: &str) {
    for i in from..to {
        let a = log
            .append(format!("default/task-{i}@1/phase"), event(i, variant))
            .await
            .unwrap();
        assert_eq!(a.seq, i);
        if (i + 1) % 10 == 0 {
            log.checkpoint().await.unwrap();
        }
    }
}

/// A log of 40 leaves with checkpoints 0..=3 at sizes 10, 20, 30, 40, signed with `signer`.
async fn build(path: &Path, signer: Arc<Ed25519Signer>, variant: &str) {
    let log = AuditLog::open(config(path), signer).await.unwrap();
    fill(&log, 0, 40, variant).await;
    // The connection is closed before anyone edits the file.
    log.close().await.unwrap();
}

fn pinned(signer: &Ed25519Signer) -> VerifyOptions {
    VerifyOptions {
        trusted_keys: vec![signer.public_key().clone()],
        trusted_checkpoints: vec![],
    }
}

fn problem(path: &Path, opts: &VerifyOptions) -> Problem {
    match verify_log(path, opts) {
        Err(VerifyError::Invalid(p)) => p,
        other => panic!("expected a verification failure, got {other:?}"),
    }
}

fn sql(path: &Path, statement: &str) {
    Connection::open(path)
        .unwrap()
        .execute_batch(statement)
        .unwrap();
}

#[tokio::test]
async fn an_untouched_log_verifies_with_the_pinned_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    build(&path, key_a(), "original").await;
    let report = verify_log(&path, &pinned(&key_a())).unwrap();
    assert_eq!(report.leaves, 40);
    assert_eq!(report.checkpoints, 4);
    assert_eq!(report.uncovered_leaves, 0);
    assert!(!report.keys_from_log);
    assert_eq!(report.origin, ORIGIN);
    // Another key: the very first checkpoint is refused.
    assert_eq!(
        problem(&path, &pinned(&key_b())),
        Problem::UnknownKey {
            index: 0,
            size: 10,
            key_id: key_a().public_key().key_id().into(),
        }
    );
}

#[tokio::test]
async fn a_tampered_leaf_is_named_with_the_checkpoint_it_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    build(&path, key_a(), "original").await;
    sql(
        &path,
        "UPDATE leaves SET data = CAST(replace(CAST(data AS TEXT), 'original step 17', 'forged step 17') AS BLOB) WHERE seq = 17",
    );
    let p = problem(&path, &pinned(&key_a()));
    assert_eq!(
        p,
        Problem::LeafHash {
            seq: 17,
            index: 1,
            size: 20
        }
    );
    assert_eq!(
        p.to_string(),
        "leaf 17: hash does not match checkpoint 1 (size 20)"
    );

    // Rewriting the recorded hash too only moves the evidence to the checkpoint, which bounds the leaf.
    let conn = Connection::open(&path).unwrap();
    let data: Vec<u8> = conn
        .query_row("SELECT data FROM leaves WHERE seq = 17", [], |r| r.get(0))
        .unwrap();
    conn.execute(
        "UPDATE leaves SET hash = ?1 WHERE seq = 17",
        [merkle::leaf_hash(&data).to_vec()],
    )
    .unwrap();
    drop(conn);
    assert_eq!(
        problem(&path, &pinned(&key_a())),
        Problem::RootMismatch {
            index: 1,
            size: 20,
            first: 10,
            last: 19
        }
    );
}

#[tokio::test]
async fn removed_leaves_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    build(&path, key_a(), "original").await;
    sql(&path, "DELETE FROM leaves WHERE seq = 12");
    let p = problem(&path, &pinned(&key_a()));
    assert_eq!(p, Problem::LeafMissing { seq: 12 });
    assert_eq!(p.to_string(), "leaf 12 missing");

    // Closing the gap by renumbering is caught by the seq each event carries.
    sql(&path, "UPDATE leaves SET seq = seq - 1 WHERE seq > 12");
    assert_eq!(
        problem(&path, &pinned(&key_a())),
        Problem::LeafSeq {
            seq: 12,
            claimed: 13
        }
    );

    // Cutting the tail below a signed size is caught too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    build(&path, key_a(), "original").await;
    sql(&path, "DELETE FROM leaves WHERE seq >= 35");
    assert_eq!(
        problem(&path, &pinned(&key_a())),
        Problem::LeafMissing { seq: 35 }
    );
}

#[tokio::test]
async fn history_rewritten_and_resigned_with_another_key_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    build(&path, key_b(), "rewritten").await;
    // Self-consistent with the key it records ...
    assert!(verify_log(&path, &VerifyOptions::default()).is_ok());
    // ... but not signed by the operator's key.
    let p = problem(&path, &pinned(&key_a()));
    assert!(matches!(p, Problem::UnknownKey { index: 0, .. }), "{p:?}");
    assert!(
        p.to_string()
            .starts_with("checkpoint 0 (size 10): signed by key")
    );
}

#[tokio::test]
async fn history_rewritten_with_the_same_key_fails_against_a_trusted_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    // The original log; its checkpoint of size 20 was exported (kept elsewhere) at the time.
    let trusted = {
        let log = AuditLog::open(config(&path), key_a()).await.unwrap();
        fill(&log, 0, 20, "original").await;
        log.close().await.unwrap();
        log.latest_checkpoint().await.unwrap_err();
        verify_log(&path, &pinned(&key_a()))
            .unwrap()
            .latest_checkpoint
            .unwrap()
    };
    std::fs::remove_file(&path).unwrap();
    let _ = std::fs::remove_file(path.with_extension("sqlite-wal"));
    let _ = std::fs::remove_file(path.with_extension("sqlite-shm"));
    // Someone holding the key rebuilds it with leaf 5 changed and re-signs everything.
    {
        let log = AuditLog::open(config(&path), key_a()).await.unwrap();
        fill(&log, 0, 5, "original").await;
        fill(&log, 5, 6, "rewritten").await;
        fill(&log, 6, 40, "original").await;
        log.close().await.unwrap();
    }
    assert!(verify_log(&path, &pinned(&key_a())).is_ok());
    let opts = VerifyOptions {
        trusted_keys: vec![key_a().public_key().clone()],
        trusted_checkpoints: vec![trusted],
    };
    let p = problem(&path, &opts);
    assert_eq!(
        p,
        Problem::HistoryRewritten {
            number: 0,
            size: 20,
            first: 0,
            last: 19
        }
    );
}

#[tokio::test]
async fn a_checkpoint_replaced_by_one_from_a_fork_breaks_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let (path, fork) = (dir.path().join("a.sqlite"), dir.path().join("b.sqlite"));
    build(&path, key_a(), "original").await;
    // Same key, same origin, same first 20 leaves, then another history.
    {
        let log = AuditLog::open(config(&fork), key_a()).await.unwrap();
        fill(&log, 0, 20, "original").await;
        fill(&log, 20, 40, "forked").await;
        log.close().await.unwrap();
    }
    let conn = Connection::open(&path).unwrap();
    conn.execute("ATTACH DATABASE ?1 AS fork", [fork.to_str().unwrap()])
        .unwrap();
    conn.execute_batch(
        "DELETE FROM checkpoints WHERE idx = 2;
         INSERT INTO checkpoints SELECT * FROM fork.checkpoints WHERE idx = 2;",
    )
    .unwrap();
    drop(conn);
    let p = problem(&path, &pinned(&key_a()));
    assert!(
        matches!(
            p,
            Problem::Inconsistent {
                index: 3,
                previous: 2,
                ..
            }
        ),
        "{p:?}"
    );
    assert!(
        p.to_string()
            .starts_with("checkpoint 3 is not consistent with checkpoint 2"),
        "{p}"
    );
}

#[tokio::test]
async fn a_restart_keeps_the_log_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    let before: SignedCheckpoint = {
        let log = AuditLog::open(config(&path), key_a()).await.unwrap();
        fill(&log, 0, 15, "original").await;
        let cp = log.checkpoint().await.unwrap();
        log.close().await.unwrap();
        cp
    };
    let log = AuditLog::open(config(&path), key_a()).await.unwrap();
    assert_eq!(
        log.latest_checkpoint().await.unwrap().as_ref(),
        Some(&before)
    );
    fill(&log, 15, 37, "original").await;
    let after = log.checkpoint().await.unwrap();
    assert_eq!((before.size, after.size), (15, 37));
    assert!(after.index > before.index);
    // The consistency proof between the checkpoints before and after the restart.
    let proof = log
        .consistency_proof(before.size, after.size)
        .await
        .unwrap();
    verify_consistency(before.size, after.size, &before.root, &after.root, &proof).unwrap();
    before.verify(key_a().public_key()).unwrap();
    after.verify(key_a().public_key()).unwrap();
    // And an inclusion proof for a leaf written before the restart, against the later checkpoint.
    let leaf = log.leaf(3).await.unwrap().unwrap();
    let path3 = log.inclusion_proof(3, after.size).await.unwrap();
    verify_inclusion(&leaf.hash, 3, after.size, &path3, &after.root).unwrap();
    log.close().await.unwrap();
    let report = verify_log(&path, &pinned(&key_a())).unwrap();
    assert_eq!((report.leaves, report.uncovered_leaves), (37, 0));
}

fn agentplane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentplane"))
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_verifies_proves_and_names_the_tampered_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    build(&path, key_a(), "original").await;
    let pem = dir.path().join("audit.pub");
    std::fs::write(&pem, key_a().public_key().to_pem()).unwrap();
    let log_arg = path.to_str().unwrap();

    let (code, out, err) = run(agentplane().args([
        "audit",
        "verify",
        "--log",
        log_arg,
        "--public-key",
        pem.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("OK: 40 leaves, 4 checkpoints"), "{out}");

    // Without a pinned key it still passes, with a warning.
    let (code, out, _) = run(agentplane().args(["audit", "verify", "--log", log_arg]));
    assert_eq!(code, 0);
    assert!(out.contains("warning"), "{out}");

    // An inclusion proof that checks out offline.
    let (code, out, err) =
        run(agentplane().args(["audit", "proof", "--log", log_arg, "--seq", "7"]));
    assert_eq!(code, 0, "{err}");
    let proof: InclusionProof = serde_json::from_str(&out).unwrap();
    assert_eq!((proof.seq, proof.tree_size), (7, 40));
    assert_eq!(proof.event.task, "task-7");
    proof.verify(key_a().public_key()).unwrap();
    let mut forged = proof.clone();
    forged.event.reason = Some("forged".into());
    assert!(forged.verify(key_a().public_key()).is_err());

    // A consistency proof between two checkpoints.
    let (code, out, err) =
        run(agentplane().args(["audit", "consistency", "--log", log_arg, "--from", "10"]));
    assert_eq!(code, 0, "{err}");
    let c: agentplane::audit::verify::ConsistencyProof = serde_json::from_str(&out).unwrap();
    verify_consistency(c.old.size, c.new.size, &c.old.root, &c.new.root, &c.proof).unwrap();

    // The latest checkpoint, kept aside, is accepted as a trusted checkpoint.
    let (code, out, _) = run(agentplane().args(["audit", "checkpoint", "--log", log_arg]));
    assert_eq!(code, 0);
    let saved = dir.path().join("checkpoint.json");
    std::fs::write(&saved, &out).unwrap();

    // Export prints one event per leaf.
    let (code, out, _) = run(agentplane().args(["audit", "export", "--log", log_arg]));
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 40);
    assert!(AuditEvent::from_leaf(out.lines().nth(39).unwrap().as_bytes()).is_ok());

    // The public key recorded in the log is the signer's.
    let (code, out, _) = run(agentplane().args(["audit", "public-key", "--log", log_arg]));
    assert_eq!(code, 0);
    assert_eq!(TrustedKey::from_pem(&out).unwrap(), *key_a().public_key());

    // Tampered: exit 1, the position named.
    sql(
        &path,
        "UPDATE leaves SET data = CAST(replace(CAST(data AS TEXT), 'original step 17', 'forged step 17') AS BLOB) WHERE seq = 17",
    );
    let (code, out, _) = run(agentplane().args([
        "audit",
        "verify",
        "--log",
        log_arg,
        "--public-key",
        pem.to_str().unwrap(),
        "--trusted-checkpoint",
        saved.to_str().unwrap(),
    ]));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.trim(),
        "FAILED: leaf 17: hash does not match checkpoint 1 (size 20)"
    );

    // A file that is not there: exit 2, not a verdict.
    let (code, _, err) = run(agentplane().args([
        "audit",
        "verify",
        "--log",
        dir.path().join("missing.sqlite").to_str().unwrap(),
    ]));
    assert_eq!(code, 2);
    assert!(err.contains("no such file"), "{err}");
}

#[tokio::test]
async fn kms_p256_checkpoints_verify_offline_with_p256() {
    use aws_sdk_kms::types::{KeySpec, KeyUsageType};
    use p256::ecdsa::signature::Verifier as _;
    use p256::pkcs8::DecodePublicKey as _;

    let stack = agentplane_testsupport::Stack::shared().unwrap_or_else(|e| panic!("{e}"));
    let kms = aws_sdk_kms::Client::new(&stack.aws_sdk_config().await);
    let key_id = kms
        .create_key()
        .key_spec(KeySpec::EccNistP256)
        .key_usage(KeyUsageType::SignVerify)
        .description(format!("audit-checkpoints-{}", uuid::Uuid::new_v4()))
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    let signer = Arc::new(KmsSigner::new(kms.clone(), &key_id).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.sqlite");
    let log = AuditLog::open(config(&path), signer.clone()).await.unwrap();
    for i in 0..12 {
        log.append(format!("k{i}"), event(i, "kms")).await.unwrap();
    }
    let first = log.checkpoint().await.unwrap();
    for i in 12..21 {
        log.append(format!("k{i}"), event(i, "kms")).await.unwrap();
    }
    let second = log.checkpoint().await.unwrap();
    log.close().await.unwrap();

    // Offline: the public key as KMS hands it out, parsed and checked by p256 alone.
    let der = kms
        .get_public_key()
        .key_id(&key_id)
        .send()
        .await
        .unwrap()
        .public_key
        .unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(der.as_ref()).unwrap();
    for cp in [&first, &second] {
        let sig = p256::ecdsa::Signature::from_der(&cp.signature).unwrap();
        vk.verify(cp.body().as_bytes(), &sig).unwrap();
        let mut forged = cp.body().into_bytes();
        forged[0] ^= 1;
        assert!(vk.verify(&forged, &sig).is_err());
    }
    // The whole log, with the KMS key pinned.
    let kms_key = TrustedKey::from_spki_der(der.as_ref()).unwrap();
    assert_eq!(kms_key.key_id(), first.key_id);
    let report = verify_log(
        &path,
        &VerifyOptions {
            trusted_keys: vec![kms_key],
            trusted_checkpoints: vec![],
        },
    )
    .unwrap();
    assert_eq!((report.leaves, report.checkpoints), (21, 2));
    let proof = {
        let log = AuditLog::open(config(&path), signer).await.unwrap();
        let p = log
            .consistency_proof(first.size, second.size)
            .await
            .unwrap();
        log.close().await.unwrap();
        p
    };
    verify_consistency(first.size, second.size, &first.root, &second.root, &proof).unwrap();

    // A symmetric key cannot sign checkpoints: refused up front, not at the first checkpoint.
    let symmetric = kms
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    assert!(KmsSigner::new(kms, symmetric).await.is_err());
}

/// Documents a moto gap (DESIGN.md §6): with MessageType=DIGEST real KMS signs the given digest, moto
/// hashes it again. This is why `KmsSigner` sends RAW bodies. If moto fixes it, this test fails and says so.
#[tokio::test]
async fn kms_digest_signing_is_a_moto_gap() {
    use aws_sdk_kms::primitives::Blob;
    use aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};
    use p256::ecdsa::signature::Verifier as _;
    use p256::pkcs8::DecodePublicKey as _;
    use sha2::Digest as _;

    let stack = agentplane_testsupport::Stack::shared().unwrap_or_else(|e| panic!("{e}"));
    let kms = aws_sdk_kms::Client::new(&stack.aws_sdk_config().await);
    let key_id = kms
        .create_key()
        .key_spec(KeySpec::EccNistP256)
        .key_usage(KeyUsageType::SignVerify)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    let body = b"agentplane.dev/audit/test\n1\nAAAA\n0\n";
    let digest = sha2::Sha256::digest(body).to_vec();
    let sig = kms
        .sign()
        .key_id(&key_id)
        .message(Blob::new(digest.clone()))
        .message_type(MessageType::Digest)
        .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
        .send()
        .await
        .unwrap()
        .signature
        .unwrap();
    let der = kms
        .get_public_key()
        .key_id(&key_id)
        .send()
        .await
        .unwrap()
        .public_key
        .unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(der.as_ref()).unwrap();
    let sig = p256::ecdsa::Signature::from_der(sig.as_ref()).unwrap();
    let as_real_kms = vk.verify(body, &sig).is_ok();
    let as_moto = vk.verify(&digest, &sig).is_ok();
    assert!(
        as_moto && !as_real_kms,
        "moto's DIGEST signing changed (real-KMS semantics: {as_real_kms}); revisit KmsSigner's RAW choice"
    );
}

fn task_spec(device: &str) -> AgentTaskSpec {
    AgentTaskSpec {
        device_ref: DeviceRef {
            name: device.into(),
        },
        envelope: Envelope {
            payload_type: "t".into(),
            payload: "e30=".into(),
            signatures: vec![EnvelopeSignature {
                keyid: String::new(),
                sig: String::new(),
            }],
        },
        user_id: "alice".into(),
        intent_type: "purchase".into(),
        privacy_level: PrivacyLevel::Public,
        required_resources: RequiredResources::default(),
        cancel: None,
    }
}

async fn audited(dir: &Path) -> (Arc<AuditedStore>, Arc<AuditLog>, PathBuf) {
    let store = SqliteStore::new(Db::open(&dir.join("db.sqlite")).unwrap(), "default");
    store
        .put_device(
            "kiosk",
            EdgeDeviceSpec {
                public_keys: vec![PublicKey {
                    id: "k1".into(),
                    alg: KeyAlgorithm::Ed25519,
                    key: "A".repeat(44),
                    not_after: None,
                }],
                owner: "o".into(),
                allowed_intents: vec![],
                revoked: false,
            },
        )
        .await
        .unwrap();
    let path = dir.join("audit.sqlite");
    let log = AuditLog::open(config(&path), key_a()).await.unwrap();
    (AuditedStore::new(store, log.clone()), log, path)
}

async fn events(log: &AuditLog) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    for seq in 0..log.size().await.unwrap() {
        out.push(log.leaf(seq).await.unwrap().unwrap().event().unwrap());
    }
    out
}

/// What the transcript test compares: kind, task, from, to, actor.
type Summary = (
    EventKind,
    String,
    Option<TaskPhase>,
    Option<TaskPhase>,
    Option<String>,
);

fn with_phase(
    t: &agentplane::store::TaskRecord,
    phase: TaskPhase,
) -> agentplane_api::task::AgentTaskStatus {
    let mut s = t.status.clone();
    s.phase = Some(phase);
    s
}

#[tokio::test]
async fn the_audited_store_records_every_transition_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, log, path) = audited(dir.path()).await;
    let new = NewTask {
        id: "t1".into(),
        spec: task_spec("kiosk"),
        seq: 1,
        trace_id: Some("trace-1".into()),
    };
    let Admission::Created(t) = store.admit(new.clone()).await.unwrap() else {
        panic!("not created")
    };
    assert_eq!(t.status.audit_seq, Some(0));
    // A resubmission is Existing and adds no leaf.
    assert!(matches!(
        store.admit(new).await.unwrap(),
        Admission::Existing(_)
    ));

    let t = store
        .update_task_status(
            "t1",
            &t.version,
            with_phase(&t, TaskPhase::AwaitingApproval),
        )
        .await
        .unwrap();
    let mut approved = with_phase(&t, TaskPhase::Queued);
    approved.approval = Some(Approval {
        decision: ApprovalDecision::Approved,
        approver: "admin".into(),
        decided_at: Time(jiff::Timestamp::now()),
        comment: Some("ok for this month".into()),
        step: None,
        args_digest: None,
    });
    let t = store
        .update_task_status("t1", &t.version, approved)
        .await
        .unwrap();
    // A same-phase status refresh records nothing.
    let mut refresh = t.status.clone();
    refresh.result = Some("partial".into());
    let t = store
        .update_task_status("t1", &t.version, refresh)
        .await
        .unwrap();
    // Running, redelivered to Queued, Running again, Succeeded: every pass is a leaf.
    let mut t = t;
    for phase in [
        TaskPhase::Running,
        TaskPhase::Queued,
        TaskPhase::Running,
        TaskPhase::Succeeded,
    ] {
        t = store
            .update_task_status("t1", &t.version, with_phase(&t, phase))
            .await
            .unwrap();
    }
    assert_eq!(t.status.audit_seq, Some(7));

    // A cancel request on another task, asked twice: recorded once.
    let Admission::Created(_) = store
        .admit(NewTask {
            id: "t2".into(),
            spec: task_spec("kiosk"),
            seq: 2,
            trace_id: None,
        })
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    store.request_cancel("t2").await.unwrap();
    store.request_cancel("t2").await.unwrap();
    let t2 = store.get_task("t2").await.unwrap().unwrap();
    let mut cancelled = with_phase(&t2, TaskPhase::Cancelled);
    cancelled.reason = Some("cancelled by the user".into());
    store
        .update_task_status("t2", &t2.version, cancelled)
        .await
        .unwrap();

    let got: Vec<Summary> = events(&log)
        .await
        .into_iter()
        .map(|e| (e.kind, e.task, e.from, e.to, e.actor))
        .collect();
    use EventKind as K;
    use TaskPhase as P;
    let admin = Some("admin".to_string());
    let device = Some("device/kiosk".to_string());
    assert_eq!(
        got,
        vec![
            (
                K::Admission,
                "t1".into(),
                None,
                Some(P::Pending),
                device.clone()
            ),
            (
                K::Decision,
                "t1".into(),
                Some(P::Pending),
                Some(P::AwaitingApproval),
                None
            ),
            (
                K::Approval,
                "t1".into(),
                Some(P::AwaitingApproval),
                Some(P::Queued),
                admin
            ),
            (
                K::Transition,
                "t1".into(),
                Some(P::AwaitingApproval),
                Some(P::Queued),
                None
            ),
            (
                K::Transition,
                "t1".into(),
                Some(P::Queued),
                Some(P::Running),
                None
            ),
            (
                K::Transition,
                "t1".into(),
                Some(P::Running),
                Some(P::Queued),
                None
            ),
            (
                K::Transition,
                "t1".into(),
                Some(P::Queued),
                Some(P::Running),
                None
            ),
            (
                K::Transition,
                "t1".into(),
                Some(P::Running),
                Some(P::Succeeded),
                None
            ),
            (K::Admission, "t2".into(), None, Some(P::Pending), device),
            (K::Decision, "t2".into(), Some(P::Pending), None, None),
            (
                K::Transition,
                "t2".into(),
                Some(P::Pending),
                Some(P::Cancelled),
                None
            ),
        ]
    );
    let all = events(&log).await;
    assert_eq!(all[2].reason.as_deref(), Some("ok for this month"));
    assert_eq!(all[10].reason.as_deref(), Some("cancelled by the user"));
    assert_eq!(all[0].details["traceId"], "trace-1");

    log.checkpoint().await.unwrap();
    log.close().await.unwrap();
    let report = verify_log(&path, &pinned(&key_a())).unwrap();
    assert_eq!(report.leaves, 11);
}

#[tokio::test]
async fn an_append_failure_fails_closed_and_heals_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (store, log, path) = audited(dir.path()).await;
    let Admission::Created(t) = store
        .admit(NewTask {
            id: "t1".into(),
            spec: task_spec("kiosk"),
            seq: 1,
            trace_id: None,
        })
        .await
        .unwrap()
    else {
        panic!("not created")
    };

    // A real failure inside the log's database: every leaf insert aborts.
    sql(
        &path,
        "CREATE TRIGGER refuse BEFORE INSERT ON leaves BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    );
    let err = store
        .update_task_status("t1", &t.version, with_phase(&t, TaskPhase::Queued))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err}");
    assert!(err.to_string().contains("write committed"), "{err}");
    assert_eq!((store.append_failures(), store.pending()), (1, 1));
    // The write itself committed (as after a lost response) ...
    let queued = store.get_task("t1").await.unwrap().unwrap();
    assert_eq!(queued.phase(), TaskPhase::Queued);
    // ... but no further write happens while its audit record is missing.
    let refused = store
        .update_task_status(
            "t1",
            &queued.version,
            with_phase(&queued, TaskPhase::Running),
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("refusing writes"), "{refused}");
    assert_eq!(
        store.get_task("t1").await.unwrap().unwrap().version,
        queued.version
    );

    // The fault clears: the backlog goes first, then the new write, in order.
    sql(&path, "DROP TRIGGER refuse;");
    store
        .update_task_status(
            "t1",
            &queued.version,
            with_phase(&queued, TaskPhase::Running),
        )
        .await
        .unwrap();
    assert_eq!(store.pending(), 0);
    let phases: Vec<_> = events(&log).await.into_iter().map(|e| e.to).collect();
    assert_eq!(
        phases,
        vec![
            Some(TaskPhase::Pending),
            Some(TaskPhase::Queued),
            Some(TaskPhase::Running)
        ]
    );
    log.checkpoint().await.unwrap();
    log.close().await.unwrap();
    assert_eq!(verify_log(&path, &pinned(&key_a())).unwrap().leaves, 3);
}
