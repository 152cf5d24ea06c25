//! The generated CRDs against a real kube-apiserver (+ etcd) from `ci/stack.sh`: they install and become
//! Established, and the API server itself enforces the CEL rules the types declare.

use std::time::Duration;

use agentplane_api::task::{AgentTaskStatus, ApprovalDecision};
use agentplane_api::{
    AgentPolicy, AgentTask, AgentTaskSpec, EdgeDevice, Envelope, IntentPayload, TaskPhase, crds,
    intent,
};
use agentplane_testsupport::Stack;
use ed25519_dalek::SigningKey;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const MANAGER: &str = "agentplane-tests";

async fn client_with_crds() -> Client {
    let stack = Stack::shared().expect("the real-peer stack must start (run `make peers` first)");
    let client = stack.kube_client().await.expect("kube client");
    let crds: Vec<serde_json::Value> = crds()
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    agentplane_testsupport::apply_crds(&client, &crds, MANAGER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    client
}

async fn namespace(client: &Client, name: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
    name.to_owned()
}

/// Creation right after the CRD is Established can still race the API server's discovery; retry a 404.
async fn try_create<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut attempts = 0;
    loop {
        match api.create(&PostParams::default(), obj).await {
            Err(kube::Error::Api(e)) if e.code == 404 && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => return other,
        }
    }
}

async fn create_retrying<K>(api: &Api<K>, obj: &K) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    try_create(api, obj)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
}

fn task(name: &str) -> AgentTask {
    let payload = IntentPayload {
        v: 1,
        task_id: name.into(),
        device_id: "kiosk-1".into(),
        user_id: "alice".into(),
        seq: 1,
        created_at: "2026-11-24T08:00:00Z".parse().unwrap(),
        consent: intent::Consent {
            granted_at: "2026-11-24T07:59:00Z".parse().unwrap(),
            scopes: vec![],
        },
        intent: intent::Intent {
            kind: "summarize".into(),
            prompt: "hello".into(),
            params: Default::default(),
        },
        privacy_level: intent::PrivacyLevel::Public,
        required_resources: Default::default(),
    };
    let envelope =
        Envelope::sign_intent(&payload, "k1", &SigningKey::from_bytes(&[1; 32])).unwrap();
    AgentTask::new(name, AgentTaskSpec::for_payload(envelope, &payload))
}

fn rejected_with(result: Result<impl std::fmt::Debug, kube::Error>, needle: &str) {
    match result {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "expected 422 Invalid, got {e:?}");
            assert!(
                e.message.contains(needle),
                "message {:?} does not mention {needle:?}",
                e.message
            );
        }
        other => panic!("expected the API server to reject this, got {other:?}"),
    }
}

async fn set_status(
    api: &Api<AgentTask>,
    name: &str,
    status: AgentTaskStatus,
) -> Result<AgentTask, kube::Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let client = client_with_crds().await;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for name in [
        "agenttasks.agentplane.dev",
        "edgedevices.agentplane.dev",
        "agentpolicies.agentplane.dev",
    ] {
        let crd = api.get(name).await.unwrap();
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
                || name.starts_with("agentpolicies")
        );
    }
}

#[tokio::test]
async fn terminal_phase_is_final_in_the_api_server() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-terminal").await;
    let api: Api<AgentTask> = Api::namespaced(client, &ns);
    let created = create_retrying(&api, &task("t-terminal")).await;
    assert_eq!(created.spec.user_id, "alice");

    let running = AgentTaskStatus {
        phase: Some(TaskPhase::Running),
        ..Default::default()
    };
    set_status(&api, "t-terminal", running.clone())
        .await
        .expect("Pending -> Running is allowed by the API server");
    let done = AgentTaskStatus {
        phase: Some(TaskPhase::Succeeded),
        result: Some("ok".into()),
        ..Default::default()
    };
    set_status(&api, "t-terminal", done)
        .await
        .expect("Running -> Succeeded");
    rejected_with(
        set_status(&api, "t-terminal", running).await,
        "terminal phases",
    );
    let stored = api.get("t-terminal").await.unwrap();
    assert_eq!(stored.status.unwrap().phase, Some(TaskPhase::Succeeded));
}

#[tokio::test]
async fn task_spec_is_immutable_but_cancel_is_not() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-immutable").await;
    let api: Api<AgentTask> = Api::namespaced(client, &ns);
    create_retrying(&api, &task("t-immutable")).await;

    let edit = api
        .patch(
            "t-immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"userId": "mallory"}})),
        )
        .await;
    rejected_with(edit, "immutable");

    let cancelled = api
        .patch(
            "t-immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await
        .expect("cancel may be set");
    assert!(cancelled.spec.cancel_requested());
    let undo = api
        .patch(
            "t-immutable",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": false}})),
        )
        .await;
    rejected_with(undo, "un-cancelled");
}

#[tokio::test]
async fn schema_rejects_an_unknown_phase() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-phase").await;
    let api: Api<AgentTask> = Api::namespaced(client, &ns);
    create_retrying(&api, &task("t-phase")).await;
    let bad = api
        .patch_status(
            "t-phase",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Done"}})),
        )
        .await;
    rejected_with(bad, "Unsupported value");
}

#[tokio::test]
async fn device_key_ids_must_be_unique_and_last_seq_only_grows() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-device").await;
    let api: Api<EdgeDevice> = Api::namespaced(client, &ns);
    let key = agentplane_api::envelope::encode_public_key(
        &SigningKey::from_bytes(&[1; 32]).verifying_key(),
    );
    let dup: EdgeDevice = serde_json::from_value(json!({
        "apiVersion": "agentplane.dev/v1alpha1", "kind": "EdgeDevice",
        "metadata": {"name": "dup"},
        "spec": {"owner": "alice", "publicKeys": [
            {"id": "k1", "alg": "ed25519", "key": key},
            {"id": "k1", "alg": "ed25519", "key": key}
        ]}
    }))
    .unwrap();
    let result = try_create(&api, &dup).await;
    rejected_with(result, "unique");

    let mut ok = dup.clone();
    ok.metadata.name = Some("ok".into());
    ok.spec.public_keys.truncate(1);
    create_retrying(&api, &ok).await;
    api.patch_status(
        "ok",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"lastSeq": 10}})),
    )
    .await
    .unwrap();
    let back = api
        .patch_status(
            "ok",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"lastSeq": 9}})),
        )
        .await;
    rejected_with(back, "lastSeq");
}

#[tokio::test]
async fn negative_budget_is_rejected() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-policy").await;
    let api: Api<AgentPolicy> = Api::namespaced(client, &ns);
    let policy = |limit: i64| -> AgentPolicy {
        serde_json::from_value(json!({
            "apiVersion": "agentplane.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": format!("p{}", limit.unsigned_abs())},
            "spec": {
                "models": [{"name": "small", "endpointKind": "builtin", "endpoint": "builtin:echo"}],
                "budgets": [{"scope": "user", "limitMicros": limit, "period": "Day"}]
            }
        }))
        .unwrap()
    };
    let result = try_create(&api, &policy(-5)).await;
    rejected_with(result, "must not be negative");
    let stored = create_retrying(&api, &policy(1_000_000)).await;
    assert_eq!(stored.spec.budgets[0].limit_micros, 1_000_000);
}

#[tokio::test]
async fn remote_model_endpoints_must_be_https() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-https").await;
    let api: Api<AgentPolicy> = Api::namespaced(client, &ns);
    let policy: AgentPolicy = serde_json::from_value(json!({
        "apiVersion": "agentplane.dev/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": "plain-http"},
        "spec": {"models": [{"name": "big", "endpointKind": "openai", "endpoint": "http://models.example.com/v1"}]}
    }))
    .unwrap();
    let result = try_create(&api, &policy).await;
    rejected_with(result, "https");
}

#[test]
fn approval_decision_names_are_stable() {
    assert_eq!(
        serde_json::to_value(ApprovalDecision::Approved).unwrap(),
        "Approved"
    );
}

#[tokio::test]
async fn rego_modules_need_exactly_one_source_and_a_data_query() {
    let client = client_with_crds().await;
    let ns = namespace(&client, "crd-rego").await;
    let api: Api<AgentPolicy> = Api::namespaced(client, &ns);
    let policy = |name: &str, rego: serde_json::Value| -> AgentPolicy {
        serde_json::from_value(json!({
            "apiVersion": "agentplane.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": name},
            "spec": {"rego": rego}
        }))
        .unwrap()
    };
    let both = policy(
        "both",
        json!({"modules": [{"name": "a.rego", "inline": "package a", "configMapRef": {"name": "cm", "key": "a.rego"}}]}),
    );
    rejected_with(try_create(&api, &both).await, "exactly one source");
    let neither = policy("neither", json!({"modules": [{"name": "a.rego"}]}));
    rejected_with(try_create(&api, &neither).await, "exactly one source");
    let bad_query = policy(
        "query",
        json!({"modules": [{"name": "a.rego", "inline": "package a"}], "query": "input.x"}),
    );
    rejected_with(try_create(&api, &bad_query).await, "query");
    let ok = policy(
        "ok",
        json!({"modules": [{"name": "a.rego", "inline": "package a"}, {"name": "b.rego", "configMapRef": {"name": "cm", "key": "b.rego"}}]}),
    );
    let created = create_retrying(&api, &ok).await;
    // The query defaults to the documented rule.
    assert_eq!(
        created.spec.rego.unwrap().query,
        agentplane_api::policy::DEFAULT_REGO_QUERY
    );
}
