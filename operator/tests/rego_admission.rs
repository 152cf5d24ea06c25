//! Rego policies at admission, over real HTTP in front of the embedded runtime (`agentplane dev`
//! in-process): a Rego denial is refused by the gateway with the policy's reasons, a
//! `require_approval` parks the task in AwaitingApproval until an approver decides, and the audit
//! leaf of each decision carries the verdict and the digest of the modules that made it. A new
//! version that does not compile leaves the previous one deciding.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agentplane::audit::{AuditEvent, EventKind};
use agentplane::client::{ClientError, DeviceIdentity, GatewayClient};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::policy::rego::{RegoSource, digest};
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{AgentPolicySpec, DEFAULT_REGO_QUERY, RegoModule, RegoPolicy};
use reqwest::StatusCode;

const APPROVER_TOKEN: &str = "approver-secret";

const POLICY: &str = r#"package agentplane
import rego.v1

default decision := {"allow": true, "require_approval": false, "reasons": []}

decision := {"allow": false, "reasons": reasons} if {
    count(reasons) > 0
}

decision := {"allow": true, "require_approval": true, "reasons": ["translations are reviewed"]} if {
    count(reasons) == 0
    input.intent.type == "translate"
}

reasons contains sprintf("intent %s is blocked for user %s", [input.intent.type, input.user.id]) if {
    input.intent.type == "delete-everything"
}

reasons contains "prompts may not mention passwords" if {
    contains(lower(input.intent.prompt), "password")
}
"#;

fn with_rego(modules: &[(&str, &str)]) -> AgentPolicySpec {
    AgentPolicySpec {
        rego: Some(RegoPolicy {
            modules: modules
                .iter()
                .map(|(name, text)| RegoModule {
                    name: (*name).into(),
                    inline: Some((*text).into()),
                    config_map_ref: None,
                })
                .collect(),
            query: DEFAULT_REGO_QUERY.into(),
        }),
        ..default_policy()
    }
}

fn config(dir: &Path) -> EmbeddedConfig {
    EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        join_tokens: vec!["join-rego".into()],
        initial_policy: Some(with_rego(&[("policy.rego", POLICY)])),
        gateway: GatewayConfig {
            approvers: vec![ApproverCredential::new("admin", APPROVER_TOKEN)],
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

async fn submit(
    gw: &GatewayClient,
    d: &DeviceIdentity,
    seq: u64,
    kind: &str,
    prompt: &str,
) -> Result<String, ClientError> {
    let payload = d.intent(seq, kind, prompt);
    gw.submit(&d.sign(&payload).unwrap())
        .await
        .map(|r| r.task_id)
}

fn refusal(r: Result<String, ClientError>) -> (StatusCode, String, String) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body.error.code, body.error.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn wait_phase(gw: &GatewayClient, d: &DeviceIdentity, id: &str, phase: TaskPhase) {
    for _ in 0..200 {
        if gw.task(d, id).await.unwrap().phase == phase {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} never reached {phase}");
}

fn export(log: &Path) -> Vec<AuditEvent> {
    let out = Command::new(env!("CARGO_BIN_EXE_agentplane"))
        .args(["audit", "export", "--log"])
        .arg(log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| AuditEvent::from_leaf(l.as_bytes()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rego_denies_with_reasons_parks_for_approval_and_is_audited_with_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Embedded::start(config(dir.path())).await.unwrap();
    let gw = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-r").unwrap();
    gw.enroll("join-rego", &d, "owner").await.unwrap();
    let good = digest(
        DEFAULT_REGO_QUERY,
        &[RegoSource {
            name: "policy.rego".into(),
            text: POLICY.into(),
        }],
    );

    // Denied by Rego: refused at the gateway with every reason and the policy's digest.
    let refused = d.intent(1, "delete-everything", "my password is hunter2");
    let (status, code, message) = refusal(
        gw.submit(&d.sign(&refused).unwrap())
            .await
            .map(|r| r.task_id),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "rego_denied")
    );
    assert_eq!(
        message,
        format!(
            "denied by Rego policy {good}: intent delete-everything is blocked for user {}; prompts may not mention passwords",
            refused.user_id
        )
    );

    // require_approval: admitted, then AwaitingApproval until the approver approves.
    let reviewed = submit(&gw, &d, 2, "translate", "bonjour").await.unwrap();
    wait_phase(&gw, &d, &reviewed, TaskPhase::AwaitingApproval).await;
    let record = rt.store.get_task(&reviewed).await.unwrap().unwrap();
    let verdict = record
        .status
        .rego
        .clone()
        .expect("the verdict is in the status");
    assert_eq!(verdict.decision.as_str(), "require_approval");
    assert_eq!(verdict.reasons, ["translations are reviewed"]);
    assert_eq!(verdict.digest, good);
    gw.decide(APPROVER_TOKEN, &reviewed, true, None)
        .await
        .unwrap();
    assert_eq!(
        gw.follow(&d, &reviewed, |_| {}).await.unwrap().phase,
        TaskPhase::Succeeded
    );

    // Allowed by Rego: runs as before.
    let fine_envelope = d
        .sign(&d.intent(3, "summarize", "the quarterly numbers"))
        .unwrap();
    let fine = gw.submit(&fine_envelope).await.unwrap().task_id;
    assert_eq!(
        gw.follow(&d, &fine, |_| {}).await.unwrap().phase,
        TaskPhase::Succeeded
    );

    // A new version that does not parse: the gateway keeps deciding with the good one.
    rt.store
        .put_policy(with_rego(&[(
            "policy.rego",
            "package agentplane\n\ndecision := {\"allow\": true\n",
        )]))
        .await
        .unwrap();
    let (status, code, message) = refusal(submit(&gw, &d, 4, "delete-everything", "again").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "rego_denied")
    );
    assert!(message.contains(&good), "{message}");
    // And the controller too: a task it admits carries the good version's digest.
    let still = submit(&gw, &d, 5, "translate", "hola").await.unwrap();
    wait_phase(&gw, &d, &still, TaskPhase::AwaitingApproval).await;
    let record = rt.store.get_task(&still).await.unwrap().unwrap();
    assert_eq!(record.status.rego.unwrap().digest, good);

    // A policy that now denies summaries does not turn the retry of one admitted earlier (its
    // answer lost on the way back, say) into a refusal: it is the existing task.
    let strict = POLICY.replace("\"delete-everything\"", "\"summarize\"");
    rt.store
        .put_policy(with_rego(&[("policy.rego", &strict)]))
        .await
        .unwrap();
    let retried = gw.submit(&fine_envelope).await.unwrap();
    assert!(retried.duplicate && retried.task_id == fine, "{retried:?}");
    let (_, code, _) = refusal(submit(&gw, &d, 6, "summarize", "new one").await);
    assert_eq!(code, "rego_denied");
    assert!(rt.store.get_task(&refused.task_id).await.unwrap().is_none());

    rt.stop().await;
    let events = export(&dir.path().join("audit.sqlite"));
    let decision = |task: &str| {
        events
            .iter()
            .find(|e| e.task == task && e.kind == EventKind::Decision)
            .unwrap_or_else(|| panic!("no decision leaf for {task}: {events:#?}"))
            .clone()
    };
    let parked = decision(&reviewed);
    assert_eq!(parked.to, Some(TaskPhase::AwaitingApproval));
    assert_eq!(parked.details["rego"]["decision"], "require_approval");
    assert_eq!(parked.details["rego"]["digest"], good.as_str());
    assert_eq!(
        parked.details["rego"]["reasons"],
        serde_json::json!(["translations are reviewed"])
    );
    let admitted = decision(&fine);
    assert_eq!(admitted.to, Some(TaskPhase::Queued));
    assert_eq!(admitted.details["rego"]["decision"], "allow");
    assert_eq!(admitted.details["rego"]["digest"], good.as_str());
    // A refused intent never became a task, so it has no leaf.
    assert!(events.iter().all(|e| e.task != refused.task_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_compiled_version_admissions_fail_closed_with_the_compile_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // The query names a rule the module does not have.
    cfg.initial_policy = Some(with_rego(&[(
        "nodecision.rego",
        "package agentplane\nimport rego.v1\n\nverdict := {\"allow\": true}\n",
    )]));
    let rt = Embedded::start(cfg).await.unwrap();
    let gw = GatewayClient::new(&rt.base_url());
    let d = DeviceIdentity::generate("kiosk-n").unwrap();
    gw.enroll("join-rego", &d, "owner").await.unwrap();
    let (status, code, message) = refusal(submit(&gw, &d, 1, "summarize", "hi").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "rego_error")
    );
    assert!(
        message.contains("no version of the AgentPolicy's Rego modules has compiled")
            && message.contains("data.agentplane.decision"),
        "{message}"
    );

    // A policy whose decision is not a decision document: refused, naming what is wrong.
    rt.store
        .put_policy(with_rego(&[(
            "number.rego",
            "package agentplane\nimport rego.v1\n\ndecision := 42\n",
        )]))
        .await
        .unwrap();
    let (status, code, message) = refusal(submit(&gw, &d, 2, "summarize", "hi").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "rego_error")
    );
    assert!(message.contains("got a number"), "{message}");
    rt.stop().await;
}

#[test]
fn the_example_policy_parses_compiles_and_decides() {
    use agentplane::policy::rego::{CompiledRego, admission_input};
    use agentplane_api::policy::{AgentPolicy, RegoDecisionKind};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rego");
    let policy: AgentPolicy =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("agentpolicy.yaml")).unwrap())
            .unwrap();
    let rego = policy.spec.rego.unwrap();
    // The ConfigMap module's text is the file beside the policy, as `kubectl create configmap` puts it.
    let sources: Vec<RegoSource> = rego
        .modules
        .iter()
        .map(|m| RegoSource {
            name: m.name.clone(),
            text: m.inline.clone().unwrap_or_else(|| {
                let key = &m.config_map_ref.as_ref().unwrap().key;
                std::fs::read_to_string(dir.join(key)).unwrap()
            }),
        })
        .collect();
    let compiled = CompiledRego::compile(&rego.query, &sources).unwrap();
    let d = DeviceIdentity::generate("kiosk-e").unwrap();
    let decide = |kind: &str, gpu: u32| {
        let mut p = d.intent(1, kind, "hello");
        p.required_resources.gpu = gpu;
        compiled.decide(&admission_input("default", &p)).unwrap()
    };
    assert_eq!(decide("summarize", 0).decision, RegoDecisionKind::Allow);
    let wire = decide("wire-money", 0);
    assert_eq!(wire.decision, RegoDecisionKind::Deny);
    assert_eq!(
        wire.reasons,
        ["intent \"wire-money\" is not offered to user \"demo-user\""]
    );
    let gpus = decide("train", 2);
    assert_eq!(gpus.decision, RegoDecisionKind::RequireApproval);
    assert_eq!(gpus.reasons, ["2 GPUs need a second pair of eyes"]);
    let args = serde_json::Map::from_iter([("path".to_owned(), serde_json::json!("/etc/shadow"))]);
    let call = agentplane::policy::rego::ToolCall {
        namespace: "default",
        intent_type: "summarize",
        server: "fs",
        tool: "read_file",
        arguments: &args,
        task_id: "t1",
        step: 2,
    };
    let v = compiled
        .decide(&agentplane::policy::rego::tool_call_input(&call))
        .unwrap();
    assert_eq!(v.decision, RegoDecisionKind::Deny);
    assert_eq!(v.reasons, ["fs/read_file may only touch /srv/shared"]);
}
