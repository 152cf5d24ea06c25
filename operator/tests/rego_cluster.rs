//! Rego policies in the distributed runtime: the `agentplane gateway` and `operator` processes over
//! kube-apiserver + etcd (and SQS on moto), with the module in a ConfigMap. The gateway refuses a
//! Rego denial with its reasons, the operator parks a `require_approval` task, and the operator
//! records each load on the AgentPolicy as the `RegoCompiled` condition: True for a module that
//! compiles; False with the module, line and the version still in force for one that does not,
//! while decisions go on with the good version.

mod cluster;

use std::time::Duration;

use agentplane::client::{ClientError, DeviceIdentity};
use agentplane::policy::rego::{RegoSource, digest};
use agentplane::store::TaskStore;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{
    AgentPolicy, ConfigMapKeyRef, DEFAULT_REGO_QUERY, RegoModule, RegoPolicy,
};
use cluster::{Cluster, JOIN_TOKEN};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};

const GOOD: &str = r#"package agentplane
import rego.v1

default decision := {"allow": true}

decision := {"allow": false, "reasons": [sprintf("%s is not for device %s", [input.intent.type, input.device.id])]} if {
    input.intent.type == "delete-everything"
}

decision := {"allow": true, "require_approval": true, "reasons": ["reviewed"]} if {
    input.intent.type == "translate"
}
"#;

const BAD: &str = "package agentplane\nimport rego.v1\n\ndecision := {\"allow\": true\n";

async fn put_module(c: &Cluster, text: &str) {
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), &c.namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "policies"},
        "data": {"admission.rego": text},
    });
    api.patch(
        "policies",
        &PatchParams::apply("rego-test").force(),
        &Patch::Apply(&cm),
    )
    .await
    .unwrap();
}

/// Waits for the AgentPolicy's `RegoCompiled` condition to have `status` and return its message.
async fn condition(c: &Cluster, status: &str, mentions: &str) -> String {
    let api: Api<AgentPolicy> = Api::namespaced(c.client.clone(), &c.namespace);
    for _ in 0..300 {
        let p = api.get("default").await.unwrap();
        if let Some(cond) = p
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == "RegoCompiled")
            && cond.status == status
            && cond.message.contains(mentions)
        {
            return cond.message.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = api.get("default").await.unwrap();
    panic!(
        "no RegoCompiled={status} mentioning {mentions:?}; status {:?}\n{}",
        p.status,
        c.logs()
    );
}

/// Submits a `translate` intent and waits for the operator to park it for approval.
async fn parked(
    c: &Cluster,
    gw: &agentplane::client::GatewayClient,
    d: &DeviceIdentity,
    seq: u64,
    prompt: &str,
) -> agentplane::store::TaskRecord {
    let task = gw
        .submit(&d.sign(&d.intent(seq, "translate", prompt)).unwrap())
        .await
        .unwrap();
    c.wait_phase(
        &task.task_id,
        |p| p == TaskPhase::AwaitingApproval,
        Duration::from_secs(60),
    )
    .await
}

fn refusal(r: Result<agentplane_api::wire::SubmitResponse, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api { status, body }) => {
            (status.as_u16(), body.error.code, body.error.message)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rego_from_a_config_map_decides_in_the_cluster_and_a_bad_version_is_reported() {
    let mut c = Cluster::new("rego").await;
    put_module(&c, GOOD).await;
    let mut policy = cluster::policy();
    policy.rego = Some(RegoPolicy {
        modules: vec![RegoModule {
            name: "admission.rego".into(),
            inline: None,
            config_map_ref: Some(ConfigMapKeyRef {
                name: "policies".into(),
                key: "admission.rego".into(),
            }),
        }],
        query: DEFAULT_REGO_QUERY.into(),
    });
    c.store.put_policy(policy).await.unwrap();
    let good = digest(
        DEFAULT_REGO_QUERY,
        &[RegoSource {
            name: "admission.rego".into(),
            text: GOOD.into(),
        }],
    );
    let gw = c.start_gateway().await;
    let _operator = c.operator("op-rego");
    let _worker = c.worker("worker-rego");
    let d = DeviceIdentity::generate("kiosk-rego").unwrap();
    gw.enroll(JOIN_TOKEN, &d, "owner").await.unwrap();

    let denied = gw
        .submit(
            &d.sign(&d.intent(1, "delete-everything", "all of it"))
                .unwrap(),
        )
        .await;
    let (status, code, message) = refusal(denied);
    assert_eq!((status, code.as_str()), (403, "rego_denied"));
    assert_eq!(
        message,
        format!("denied by Rego policy {good}: delete-everything is not for device kiosk-rego")
    );

    let t = parked(&c, &gw, &d, 2, "bonjour").await;
    let verdict = t.status.rego.expect("verdict in the task status");
    assert_eq!(
        (verdict.decision.as_str(), verdict.digest.as_str()),
        ("require_approval", good.as_str())
    );
    let fine = gw
        .submit(&d.sign(&d.intent(3, "summarize", "hello")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        c.wait_terminal(&fine.task_id).await.phase(),
        TaskPhase::Succeeded
    );
    condition(&c, "True", &good).await;

    // A version that does not parse: reported on the policy with the module and line as soon as
    // the operator loads it (no task needed), and the good version stays in force in the operator
    // and in the gateway.
    put_module(&c, BAD).await;
    let message = condition(&c, "False", "admission.rego:5:1").await;
    assert!(
        message.contains(&format!("version {good} stays in force")),
        "{message}"
    );
    let t = parked(&c, &gw, &d, 4, "hola").await;
    assert_eq!(t.status.rego.unwrap().digest, good);
    let (status, code, message) = refusal(
        gw.submit(&d.sign(&d.intent(5, "delete-everything", "again")).unwrap())
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "rego_denied"));
    assert!(message.contains(&good), "{message}");

    // Fixed again: the condition turns True for the new version.
    let fixed = GOOD.replace("reviewed", "reviewed again");
    put_module(&c, &fixed).await;
    let t = parked(&c, &gw, &d, 6, "ciao").await;
    assert_eq!(t.status.rego.unwrap().reasons, ["reviewed again"]);
    let stored = c.store.get_policy().await.unwrap().unwrap();
    assert!(stored.rego.is_some());
    condition(&c, "True", "compiled and in force").await;
}
