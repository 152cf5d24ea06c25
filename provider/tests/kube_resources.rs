//! The Kubernetes-side resources (`agentplane_platform`, `agentplane_keda_scaler`,
//! `agentplane_edge_device`, `agentplane_agent_policy`) against a real kube-apiserver from the
//! shared stack — with the real KEDA CRDs from `../shared/crds/keda` — driven two ways:
//!
//! - through the library (`Resource` calls with provider data), for what needs a precise look:
//!   the chart parity of the platform's objects (Helm renders the chart, we compare object by
//!   object), strict server-side dry runs, drift, field manager conflicts, a terminating
//!   namespace, an unreachable API and a bad token;
//! - through OpenTofu (protocol 6) and Terraform 1.5.7 (protocol 5), installed from a
//!   filesystem mirror like `tests/e2e.rs`, for the whole lifecycle: create, empty second plan,
//!   in-place update, ForceNew replacement, import, out-of-band delete -> recreate, a conflict
//!   reported and then forced, destroy leaving nothing behind; and (OpenTofu only) the
//!   operator's audit log: the Deployment/StatefulSet switch and the storage change refused at
//!   plan; and (both clients) every agentic field of `agentplane_agent_policy` (issue 14): read
//!   back, drift from hand edits, and the CRD's rules enforced at plan.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentplane_testsupport::{Stack, TEST_REGION};
use common::Workspace;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value as Json, json};
use terraform_provider_agentplane::config::{AwsSettings, KubeSettings, ProviderData};
use terraform_provider_agentplane::framework::diag::Severity;
use terraform_provider_agentplane::framework::{
    AttrPath, Block, Diagnostics, Resource, Value, codec, plan,
};
use terraform_provider_agentplane::kube::FIELD_MANAGER;
use terraform_provider_agentplane::platform_manifests::{self as pm, PlatformSpec};
use terraform_provider_agentplane::resources::agent_policy::{AgentPolicy, manifest};
use terraform_provider_agentplane::resources::edge_device::EdgeDevice;
use terraform_provider_agentplane::resources::keda_scaler::KedaScaler;
use terraform_provider_agentplane::resources::platform::Platform;

/// Field manager of this test's own writes (never the provider's).
const TEST_MANAGER: &str = "kube-resources-test";
/// RFC 8032 test vectors 1 and 2: valid Ed25519 public keys, base64.
const KEY1: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
const KEY2: &str = "PUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw=";

fn stack() -> &'static Stack {
    Stack::shared().unwrap_or_else(|e| panic!("real-peer stack unavailable: {e}"))
}

fn env(stack: &Stack, key: &str) -> String {
    stack
        .env()
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing from stack.env"))
        .clone()
}

fn kube_settings(stack: &Stack) -> KubeSettings {
    KubeSettings {
        host: Some(env(stack, "AGENTPLANE_KUBE_SERVER")),
        token: Some(env(stack, "AGENTPLANE_KUBE_TOKEN")),
        cluster_ca_certificate: Some(
            std::fs::read_to_string(env(stack, "AGENTPLANE_KUBE_CA")).unwrap(),
        ),
        ..Default::default()
    }
}

fn provider_data(kube: KubeSettings) -> ProviderData {
    ProviderData::new(AwsSettings::default(), kube)
}

/// A name no other test in this process (or an earlier run against a reused stack) uses.
fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What Terraform would plan for creating `config` (validated as Terraform would).
fn plan_create<R: Resource<ProviderData>>(r: &R, config: Json) -> Value {
    let (p, d) = plan_unchecked(r, &config);
    assert!(d.is_empty(), "config does not validate:\n{d}");
    p
}

/// The plan for creating `config`, and what validating it as Terraform does reported (the plan
/// is made whatever that says, to see what the API server makes of it).
fn plan_unchecked<R: Resource<ProviderData>>(r: &R, config: &Json) -> (Value, Diagnostics) {
    let schema = r.schema();
    let cfg = codec::from_json(config, &schema.block.ty(), &AttrPath::root(), 0)
        .unwrap_or_else(|e| panic!("config does not decode: {e:?}"));
    let mut d = Diagnostics::new();
    schema
        .block
        .validate_config(&cfg, &AttrPath::root(), &mut d);
    r.validate(&cfg, &mut d);
    let cfg = empty_blocks(&schema.block, cfg);
    let mut p = plan::plan(&schema.block, &Value::Null, &cfg, &cfg).state;
    r.modify_plan(&Value::Null, &mut p, &cfg, &mut d);
    (p, d)
}

/// Terraform sends an absent list block as `[]`, never null; so does this.
fn empty_blocks(block: &Block, v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    for b in &block.blocks {
        let items = match m.remove(b.type_name).unwrap_or_default() {
            Value::List(items) => items
                .into_iter()
                .map(|i| empty_blocks(&b.block, i))
                .collect(),
            _ => vec![],
        };
        m.insert(b.type_name.to_string(), Value::List(items));
    }
    Value::Object(m)
}

fn api(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = terraform_provider_agentplane::kube::plural(kind);
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

async fn get(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
) -> Option<Json> {
    api(client, api_version, kind, Some(ns))
        .get_opt(name)
        .await
        .unwrap()
        .map(|o| serde_json::to_value(o).unwrap())
}

async fn create_namespace(client: &kube::Client, ns: &str) {
    let obj: DynamicObject = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .unwrap();
    api(client, "v1", "Namespace", None)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
}

/// An apply by someone else (`manager`), taking the fields over as kubectl --force-conflicts does.
async fn intrude(client: &kube::Client, manager: &str, obj: &Json) {
    let ns = obj["metadata"]["namespace"].as_str();
    let a = api(
        client,
        obj["apiVersion"].as_str().unwrap(),
        obj["kind"].as_str().unwrap(),
        ns,
    );
    a.patch(
        obj["metadata"]["name"].as_str().unwrap(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(obj),
    )
    .await
    .unwrap_or_else(|e| panic!("intruder apply: {e}"));
}

/// A strict server-side dry-run apply by the test's own manager.
async fn strict_dry_run(client: &kube::Client, obj: &Json) -> Result<(), kube::Error> {
    let a = api(
        client,
        obj["apiVersion"].as_str().unwrap(),
        obj["kind"].as_str().unwrap(),
        obj["metadata"]["namespace"].as_str(),
    );
    a.patch(
        obj["metadata"]["name"].as_str().unwrap(),
        &PatchParams::apply(TEST_MANAGER)
            .force()
            .dry_run()
            .validation_strict(),
        &Patch::Apply(obj),
    )
    .await
    .map(|_| ())
}

fn keda_crds() -> Vec<Json> {
    let dir = std::env::var_os("AGENTPLANE_CRDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| agentplane_testsupport::repo_root().join("../shared/crds"))
        .join("keda");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("KEDA CRDs in {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| parse_stream(&std::fs::read_to_string(f).unwrap()))
        .collect()
}

/// Every non-empty document of a YAML stream.
fn parse_stream(yaml: &str) -> Vec<Json> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| <Json as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Installs the real KEDA CRDs (idempotent; tests share the stack).
async fn install_keda(client: &kube::Client) {
    agentplane_testsupport::apply_crds(client, &keda_crds(), TEST_MANAGER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// Library-level checks
// ---------------------------------------------------------------------------------------------

fn tiers() -> Json {
    json!([
        {"name": "large", "endpointKind": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4.1",
         "pricePer1kInputMicros": 2000, "pricePer1kOutputMicros": 8000, "privacyLevels": ["public"],
         "secretRef": {"name": "openai-api-key", "key": "token"}},
        {"name": "dev", "endpointKind": "builtin", "endpoint": "builtin:echo"}
    ])
}

/// The platform's objects equal the chart's for the same inputs (release `agentplane`),
/// apart from labels and annotations (Helm's bookkeeping, and the checksum's algorithm): without
/// the audit log, and with it (local key and cluster-default class; KMS key and a class), where
/// both render the operator as a StatefulSet.
#[test]
fn platform_objects_match_the_helm_chart() {
    let home = tempfile::tempdir().unwrap();
    let audits = [
        (json!({"enabled": false}), None),
        (
            json!({"enabled": true}),
            Some(pm::AuditSpec {
                kms_key_arn: None,
                storage_size: "1Gi".into(),
                storage_class: None,
            }),
        ),
        (
            json!({"enabled": true, "kmsKeyArn": "arn:aws:kms:eu-west-1:1:key/audit",
                   "storage": {"size": "5Gi", "storageClassName": "gp3"}}),
            Some(pm::AuditSpec {
                kms_key_arn: Some("arn:aws:kms:eu-west-1:1:key/audit".into()),
                storage_size: "5Gi".into(),
                storage_class: Some("gp3".into()),
            }),
        ),
    ];
    for (values, audit) in audits {
        let chart = parity_chart(home.path(), &values);
        let ours = pm::manifests(&parity_spec(audit.clone()));
        assert_same_objects(&chart, &ours);
        let operator = |objs: &[Json]| {
            objs.iter()
                .filter(|o| o["metadata"]["name"] == "agentplane-operator")
                .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
                .map(|o| o["kind"].clone())
                .collect::<Vec<_>>()
        };
        let kind = if audit.is_some() {
            "StatefulSet"
        } else {
            "Deployment"
        };
        assert_eq!(operator(&chart), vec![json!(kind)], "{values}");
        assert_eq!(operator(&ours), vec![json!(kind)], "{values}");
    }
}

const PARITY_NS: &str = "agentplane-parity";

/// `helm template` of the parity inputs, with `audit` as `operator.audit`.
fn parity_chart(home: &Path, audit: &Json) -> Vec<Json> {
    let values = home.join("values.yaml");
    let ns = PARITY_NS;
    let mut vals = json!({
        "image": {"repository": "example.com/agentplane", "tag": "1.2.3"},
        "aws": {"region": "eu-west-1"},
        "queue": {"url": "https://sqs.eu-west-1.amazonaws.com/1/tasks", "deadLetterUrl": "https://sqs.eu-west-1.amazonaws.com/1/tasks-dlq",
                  "visibilityTimeoutSeconds": 120, "maxReceiveCount": 3, "fifo": true},
        "kms": {"keyArn": "arn:aws:kms:eu-west-1:1:key/k"},
        "models": {"tiers": tiers()},
        "operator": {"replicas": 3, "concurrency": 8},
        "worker": {"replicas": 4, "concurrency": 6, "secretNames": ["openai-api-key"],
                   "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/worker"}}},
        "gateway": {"replicas": 1, "credentialsSecret": "gw-creds", "service": {"type": "LoadBalancer", "port": 8443}},
    });
    vals["operator"]["audit"] = audit.clone();
    std::fs::write(&values, serde_yaml::to_string(&vals).unwrap()).unwrap();
    let out = agentplane_testsupport::peer_command("helm")
        .unwrap_or_else(|e| panic!("{e}"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(["template", "agentplane"])
        .arg(agentplane_testsupport::repo_root().join("charts/agentplane"))
        .args(["--namespace", ns, "--values"])
        .arg(&values)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_stream(&String::from_utf8_lossy(&out.stdout))
}

/// The platform inputs matching `parity_chart`'s values.
fn parity_spec(operator_audit: Option<pm::AuditSpec>) -> PlatformSpec {
    PlatformSpec {
        namespace: PARITY_NS.into(),
        create_namespace: false,
        image: "example.com/agentplane:1.2.3".into(),
        image_pull_policy: "IfNotPresent".into(),
        queue_url: "https://sqs.eu-west-1.amazonaws.com/1/tasks".into(),
        dlq_url: "https://sqs.eu-west-1.amazonaws.com/1/tasks-dlq".into(),
        queue_fifo: true,
        visibility_timeout_seconds: 120,
        max_receive_count: 3,
        region: Some("eu-west-1".into()),
        aws_endpoint_url: None,
        kms_key_arn: Some("arn:aws:kms:eu-west-1:1:key/k".into()),
        model_tiers: serde_json::from_value(tiers()).unwrap(),
        log_level: "info".into(),
        log_format: "json".into(),
        operator_replicas: 3,
        operator_concurrency: 8,
        operator_audit,
        worker_replicas: Some(4),
        worker_concurrency: 6,
        worker_secret_names: vec!["openai-api-key".into()],
        gateway_enabled: true,
        gateway_replicas: 1,
        gateway_port: 8443,
        gateway_service_type: "LoadBalancer".into(),
        gateway_service_port: 8443,
        gateway_tls_secret_name: "agentplane-gateway-tls".into(),
        gateway_credentials_secret: Some("gw-creds".into()),
        service_account_annotations: BTreeMap::from([(
            "worker".to_string(),
            BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_string(),
                "arn:aws:iam::1:role/worker".to_string(),
            )]),
        )]),
    }
}

/// Both sides render the same objects, field for field (see `normalize`).
fn assert_same_objects(chart: &[Json], ours: &[Json]) {
    let key = |o: &Json| {
        format!(
            "{} {}",
            o["kind"].as_str().unwrap(),
            o["metadata"]["name"].as_str().unwrap()
        )
    };
    let chart_keys: Vec<String> = {
        let mut k: Vec<String> = chart.iter().map(key).collect();
        k.sort();
        k
    };
    let our_keys: Vec<String> = {
        let mut k: Vec<String> = ours.iter().map(key).collect();
        k.sort();
        k
    };
    assert_eq!(our_keys, chart_keys, "the same objects");

    for theirs in chart {
        let mine = ours.iter().find(|o| key(o) == key(theirs)).unwrap();
        let k = key(theirs);
        if theirs["kind"] == "ServiceAccount" {
            assert_eq!(
                mine["metadata"]["annotations"], theirs["metadata"]["annotations"],
                "{k}: annotations"
            );
        }
        if theirs["kind"] == "Deployment" || theirs["kind"] == "StatefulSet" {
            let ann = |o: &Json| {
                o.pointer("/spec/template/metadata/annotations/checksum~1models")
                    .is_some()
            };
            assert_eq!(ann(mine), ann(theirs), "{k}: checksum annotation");
        }
        let (mine, theirs) = (normalize(mine), normalize(theirs));
        if k.starts_with("ConfigMap") {
            let tiers = |o: &Json| -> Vec<agentplane_api::policy::ModelTier> {
                #[derive(serde::Deserialize)]
                struct T {
                    tiers: Vec<agentplane_api::policy::ModelTier>,
                }
                let t: T = serde_yaml::from_str(o["data"]["tiers.yaml"].as_str().unwrap()).unwrap();
                t.tiers
            };
            assert_eq!(tiers(&mine), tiers(&theirs), "{k}: model tiers");
            assert_eq!(tiers(&mine).len(), 2);
            continue;
        }
        assert_eq!(
            mine,
            theirs,
            "{k} differs from the chart:\nours:  {}\nchart: {}",
            serde_json::to_string_pretty(&mine).unwrap(),
            serde_json::to_string_pretty(&theirs).unwrap()
        );
    }
}

fn normalize(o: &Json) -> Json {
    let mut o = o.clone();
    // We write the `apiVersion: v1` the server defaults in a fieldRef (see field_env); the
    // chart leaves it to the default. Both store the same object.
    if let Some(cs) = o
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Json::as_array_mut)
    {
        for e in cs
            .iter_mut()
            .filter_map(|c| c["env"].as_array_mut())
            .flatten()
        {
            if let Some(f) = e
                .pointer_mut("/valueFrom/fieldRef")
                .and_then(Json::as_object_mut)
            {
                f.entry("apiVersion").or_insert(json!("v1"));
            }
        }
    }
    for p in ["/metadata", "/spec/template/metadata"] {
        if let Some(m) = o.pointer_mut(p).and_then(Json::as_object_mut) {
            m.remove("labels");
            m.remove("annotations");
        }
    }
    o
}

fn platform_config(ns: &str) -> Json {
    json!({
        "namespace": ns,
        "image": "example.com/agentplane:1.0.0",
        "queue_url": "http://127.0.0.1:5000/123456789012/tasks",
        "dlq_url": "http://127.0.0.1:5000/123456789012/tasks-dlq",
        "region": TEST_REGION,
        "kms_key_arn": "arn:aws:kms:us-east-1:123456789012:key/test",
        "operator_replicas": 1,
        "worker_secret_names": ["openai-api-key"],
        "model_tier": [
            {"name": "dev", "endpoint_kind": "builtin", "endpoint": "builtin:echo"}
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_applies_strictly_detects_drift_and_reports_conflicts() {
    let stack = stack();
    let client = stack.kube_client().await.unwrap();
    let data = provider_data(kube_settings(stack));
    let ns = unique("plat");

    let planned = plan_create(&Platform, platform_config(&ns));
    let state = Platform
        .create(&data, &planned)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(state.get("crds_established"), &Value::Bool(true));
    assert_eq!(state.get("drift"), &Value::List(vec![]));
    assert_eq!(state, planned, "apply result equals the plan");

    // Read right after apply gives the applied state back: an empty second plan.
    let read = Platform.read(&data, &state).await.unwrap().unwrap();
    assert_eq!(read, state);

    // The CRDs are served, the Deployments exist, written by our field manager with the env
    // contract, and the worker's replica count is left to an autoscaler.
    for c in ["operator", "worker", "gateway"] {
        let d = get(
            &client,
            "apps/v1",
            "Deployment",
            &ns,
            &format!("agentplane-{c}"),
        )
        .await
        .unwrap_or_else(|| panic!("{c} Deployment missing"));
        let managers: Vec<&str> = d["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, vec![FIELD_MANAGER], "{c}");
        if c == "worker" {
            let env: BTreeMap<&str, &str> = d["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
                .collect();
            assert_eq!(
                env["AGENTPLANE_QUEUE_URL"],
                "http://127.0.0.1:5000/123456789012/tasks"
            );
            assert_eq!(
                env["AGENTPLANE_DLQ_URL"],
                "http://127.0.0.1:5000/123456789012/tasks-dlq"
            );
            assert_eq!(env["AWS_REGION"], TEST_REGION);
            assert_eq!(
                env["AGENTPLANE_KMS_KEY_ID"],
                "arn:aws:kms:us-east-1:123456789012:key/test"
            );
            assert_eq!(env["AGENTPLANE_MODEL_TIERS_FILE"], pm::TIERS_FILE);
            assert!(
                !terraform_provider_agentplane::kube::owns_field(&d, &["spec", "replicas"]),
                "worker replicas must not be ours when worker_replicas is unset"
            );
        }
    }
    for crd in pm::crds() {
        let name = crd["metadata"]["name"].as_str().unwrap();
        let got = api(
            &client,
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
        )
        .get(name)
        .await
        .unwrap();
        assert!(terraform_provider_agentplane::kube::crd_established(
            &serde_json::to_value(got).unwrap()
        ));
    }

    // Every object passes a strict server-side dry run (unknown fields are errors), and the
    // check itself can fail: a Deployment with an unknown field is refused.
    let spec = terraform_provider_agentplane::resources::platform::spec_from_value(&state).unwrap();
    let manifests = pm::manifests(&spec);
    for m in &manifests {
        strict_dry_run(&client, m)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", m["metadata"]["name"]));
    }
    let mut bad = manifests
        .iter()
        .find(|m| m["kind"] == "Deployment")
        .unwrap()
        .clone();
    bad["spec"]["template"]["spec"]["containers"][0]["bogusField"] = json!(1);
    let err = strict_dry_run(&client, &bad).await.unwrap_err();
    assert!(err.to_string().contains("bogusField"), "{err}");

    // Out-of-band delete of one object: drift lists it, the plan re-applies it.
    api(&client, "apps/v1", "Deployment", Some(&ns))
        .delete("agentplane-worker", &Default::default())
        .await
        .unwrap();
    let read = Platform.read(&data, &state).await.unwrap().unwrap();
    let drift = terraform_provider_agentplane::kube::strings(read.get("drift"));
    assert_eq!(
        drift,
        vec![format!(
            "Deployment {ns}/agentplane-worker: deleted outside Terraform"
        )]
    );
    let mut planned = read.clone();
    Platform.modify_plan(&read, &mut planned, &read, &mut Diagnostics::new());
    assert_ne!(planned, read, "drift must plan an update");
    let state = Platform
        .update(&data, &read, &planned)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(Platform.read(&data, &state).await.unwrap().unwrap(), state);

    // A field we do not map to an input (a Role rule) edited by someone else: drift names it.
    let mut role = manifests
        .iter()
        .find(|m| m["kind"] == "Role" && m["metadata"]["name"] == "agentplane-worker")
        .unwrap()
        .clone();
    role["rules"][0]["verbs"] = json!(["get", "list", "watch", "delete"]);
    intrude(&client, "kubectl-edit", &role).await;
    let read = Platform.read(&data, &state).await.unwrap().unwrap();
    let drift = terraform_provider_agentplane::kube::strings(read.get("drift"));
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(
        drift[0].contains("Role")
            && drift[0].contains(".rules")
            && drift[0].contains("kubectl-edit"),
        "{drift:?}"
    );

    // Updating now conflicts (someone else owns a field we set): reported with the field and
    // the manager, nothing overwritten; `force = true` takes it back.
    let mut planned = read.clone();
    Platform.modify_plan(&read, &mut planned, &read, &mut Diagnostics::new());
    let d = Platform.update(&data, &read, &planned).await.unwrap_err();
    let text = d.to_string();
    assert!(
        text.contains(&format!("agentplane_platform \"{ns}\"")),
        "{text}"
    );
    assert!(
        text.contains(".rules") && text.contains("\"kubectl-edit\""),
        "{text}"
    );
    let live = get(
        &client,
        "rbac.authorization.k8s.io/v1",
        "Role",
        &ns,
        "agentplane-worker",
    )
    .await
    .unwrap();
    assert_eq!(
        live["rules"][0]["verbs"],
        json!(["get", "list", "watch", "delete"])
    );
    planned.set("force", Value::Bool(true));
    let state = Platform
        .update(&data, &read, &planned)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    let live = get(
        &client,
        "rbac.authorization.k8s.io/v1",
        "Role",
        &ns,
        "agentplane-worker",
    )
    .await
    .unwrap();
    assert_eq!(live["rules"][0]["verbs"], json!(["get", "list", "watch"]));
    assert_eq!(Platform.read(&data, &state).await.unwrap().unwrap(), state);

    // An input changed out of band shows as that input's diff.
    let mut op = manifests
        .iter()
        .find(|m| m["kind"] == "Deployment" && m["metadata"]["name"] == "agentplane-operator")
        .unwrap()
        .clone();
    op["spec"]["replicas"] = json!(5);
    intrude(&client, "hpa-like", &json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "agentplane-operator", "namespace": ns},
        "spec": {"replicas": 5, "selector": op["spec"]["selector"], "template": op["spec"]["template"]},
    }))
    .await;
    let read = Platform.read(&data, &state).await.unwrap().unwrap();
    assert_eq!(read.get("operator_replicas"), &Value::int(5));

    // Import by namespace reads every input back.
    let imported = Platform.import_state(&ns).unwrap();
    let mut imported = Platform.read(&data, &imported).await.unwrap().unwrap();
    imported.set("operator_replicas", Value::int(1));
    let mut expected = state.clone();
    expected.set("force", Value::Bool(false));
    assert_eq!(imported, expected);

    // Destroy removes every object it applied (the CRDs stay: delete_crds is false).
    Platform
        .delete(&data, &state)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    for m in &manifests {
        let r = terraform_provider_agentplane::kube::ObjRef::of(m).unwrap();
        let left = match &r.namespace {
            Some(ns) => get(&client, &r.ar.api_version, &r.ar.kind, ns, &r.name).await,
            None => api(&client, &r.ar.api_version, &r.ar.kind, None)
                .get_opt(&r.name)
                .await
                .unwrap()
                .map(|o| serde_json::to_value(o).unwrap())
                .filter(|n| !terraform_provider_agentplane::kube::terminating(n)),
        };
        assert!(left.is_none(), "{r} left after destroy");
    }
    let crd = api(
        &client,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        None,
    )
    .get_opt("agenttasks.agentplane.dev")
    .await
    .unwrap();
    assert!(crd.is_some(), "CRDs are kept on destroy by default");
    // The namespace is terminating (no namespace controller here), so the platform reads as gone.
    assert!(Platform.read(&data, &state).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_object_is_accepted_by_the_real_keda_schema() {
    let stack = stack();
    let client = stack.kube_client().await.unwrap();
    install_keda(&client).await;
    let data = provider_data(kube_settings(stack));
    let ns = unique("keda");
    create_namespace(&client, &ns).await;

    let planned = plan_create(
        &KedaScaler,
        json!({
            "namespace": ns,
            "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/tasks",
            "aws_region": "us-east-1",
            "queue_length": 7,
            "activation_queue_length": 2,
            "min_replicas": 1,
            "max_replicas": 20,
        }),
    );
    let state = KedaScaler
        .create(&data, &planned)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(
        KedaScaler.read(&data, &state).await.unwrap().unwrap(),
        state
    );

    let so = get(
        &client,
        "keda.sh/v1alpha1",
        "ScaledObject",
        &ns,
        "agentplane-worker",
    )
    .await
    .unwrap();
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], "agentplane-worker");
    assert_eq!(so["spec"]["maxReplicaCount"], 20);
    let t = &so["spec"]["triggers"][0];
    assert_eq!(t["type"], "aws-sqs-queue");
    assert_eq!(t["metadata"]["queueLength"], "7");
    assert_eq!(t["metadata"]["activationQueueLength"], "2");
    assert_eq!(t["authenticationRef"]["name"], "agentplane-sqs");
    let ta = get(
        &client,
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        &ns,
        "agentplane-sqs",
    )
    .await
    .unwrap();
    assert_eq!(
        ta["spec"]["podIdentity"],
        json!({"provider": "aws", "identityOwner": "workload"})
    );

    // The schema is the real one: what it does not know is refused under strict validation,
    // and what it forbids (an identityOwner outside its enum) is refused outright.
    let mut bad = so.clone();
    for k in [
        "managedFields",
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "generation",
    ] {
        bad["metadata"].as_object_mut().unwrap().remove(k);
    }
    bad.as_object_mut().unwrap().remove("status");
    bad["spec"]["triggers"][0]["bogusField"] = json!("x");
    let err = strict_dry_run(&client, &bad).await.unwrap_err();
    assert!(err.to_string().contains("bogusField"), "{err}");
    let bad_ta = json!({"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
        "metadata": {"name": "agentplane-sqs", "namespace": ns},
        "spec": {"podIdentity": {"provider": "aws", "identityOwner": "pod"}}});
    let err = strict_dry_run(&client, &bad_ta).await.unwrap_err();
    assert!(err.to_string().contains("identityOwner"), "{err}");

    // A role ARN instead of an identity owner, in place.
    let mut planned2 = state.clone();
    planned2.set(
        "role_arn",
        Value::string("arn:aws:iam::123456789012:role/keda-sqs"),
    );
    let state2 = KedaScaler
        .update(&data, &state, &planned2)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    let ta = get(
        &client,
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        &ns,
        "agentplane-sqs",
    )
    .await
    .unwrap();
    assert_eq!(
        ta["spec"]["podIdentity"],
        json!({"provider": "aws", "roleArn": "arn:aws:iam::123456789012:role/keda-sqs"})
    );
    assert_eq!(
        KedaScaler.read(&data, &state2).await.unwrap().unwrap(),
        state2
    );

    // Deleting the TriggerAuthentication out of band makes the resource gone (recreate both).
    api(
        &client,
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        Some(&ns),
    )
    .delete("agentplane-sqs", &Default::default())
    .await
    .unwrap();
    assert!(KedaScaler.read(&data, &state2).await.unwrap().is_none());
    KedaScaler
        .delete(&data, &state2)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    assert!(
        get(
            &client,
            "keda.sh/v1alpha1",
            "ScaledObject",
            &ns,
            "agentplane-worker"
        )
        .await
        .is_none()
    );
}

async fn agentplane_crds(client: &kube::Client) {
    agentplane_testsupport::apply_crds(client, &pm::crds(), TEST_MANAGER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

fn device_config(ns: &str, name: &str, owner: &str) -> Json {
    json!({
        "namespace": ns,
        "name": name,
        "owner": owner,
        "public_key": [{"id": "k1", "key": KEY1, "not_after": "2030-01-01T00:00:00Z"}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_owned_by_another_manager_is_a_conflict_unless_forced() {
    let stack = stack();
    let client = stack.kube_client().await.unwrap();
    agentplane_crds(&client).await;
    let data = provider_data(kube_settings(stack));
    let ns = unique("conflict");
    create_namespace(&client, &ns).await;

    // The gateway registered this device (join token) with owner alice.
    intrude(&client, "agentplane-gateway", &json!({
        "apiVersion": "agentplane.dev/v1alpha1", "kind": "EdgeDevice",
        "metadata": {"name": "laptop", "namespace": ns},
        "spec": {"owner": "alice", "publicKeys": [{"id": "k1", "alg": "ed25519", "key": KEY1, "notAfter": "2030-01-01T00:00:00Z"}]},
    }))
    .await;

    let planned = plan_create(&EdgeDevice, device_config(&ns, "laptop", "bob"));
    let d = EdgeDevice.create(&data, &planned).await.unwrap_err();
    let text = d.to_string();
    assert!(
        text.contains("Field manager conflict on agentplane_edge_device \"laptop\""),
        "{text}"
    );
    assert!(text.contains(".spec.owner"), "{text}");
    assert!(text.contains("\"agentplane-gateway\""), "{text}");
    assert!(
        !text.contains(".spec.publicKeys"),
        "equal values are shared, not conflicts: {text}"
    );
    let live = get(
        &client,
        "agentplane.dev/v1alpha1",
        "EdgeDevice",
        &ns,
        "laptop",
    )
    .await
    .unwrap();
    assert_eq!(live["spec"]["owner"], "alice", "nothing was overwritten");

    let mut forced = planned.clone();
    forced.set("force", Value::Bool(true));
    let state = EdgeDevice
        .create(&data, &forced)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    let live = get(
        &client,
        "agentplane.dev/v1alpha1",
        "EdgeDevice",
        &ns,
        "laptop",
    )
    .await
    .unwrap();
    assert_eq!(live["spec"]["owner"], "bob");
    assert!(terraform_provider_agentplane::kube::owns_field(
        &live,
        &["spec", "owner"]
    ));
    assert_eq!(
        EdgeDevice.read(&data, &state).await.unwrap().unwrap(),
        state
    );

    // Same for a policy: someone flips the kill switch with their own manager.
    let planned = plan_create(&AgentPolicy, json!({"namespace": ns, "suspend": false}));
    let state = AgentPolicy
        .create(&data, &planned)
        .await
        .unwrap_or_else(|d| panic!("{d}"));
    intrude(
        &client,
        "ops-console",
        &json!({
            "apiVersion": "agentplane.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "default", "namespace": ns}, "spec": {"suspend": true},
        }),
    )
    .await;
    let read = AgentPolicy.read(&data, &state).await.unwrap().unwrap();
    assert_eq!(
        read.get("suspend"),
        &Value::Bool(true),
        "drift shows on the attribute"
    );
    let d = AgentPolicy.update(&data, &read, &state).await.unwrap_err();
    assert!(
        d.to_string().contains(".spec.suspend") && d.to_string().contains("\"ops-console\""),
        "{d}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_is_reported_with_resource_and_endpoint() {
    let stack = stack();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = kube_settings(stack);
    settings.host = Some(format!("https://127.0.0.1:{port}"));
    let data = provider_data(settings);
    let planned = plan_create(&EdgeDevice, device_config("team-a", "tablet", "alice"));
    for d in [
        EdgeDevice.create(&data, &planned).await.unwrap_err(),
        EdgeDevice.read(&data, &planned).await.unwrap_err(),
    ] {
        let e = &d.0[0];
        assert_eq!(
            e.summary,
            "Cannot reach the Kubernetes API for agentplane_edge_device \"tablet\""
        );
        assert!(
            e.detail.contains(&format!("https://127.0.0.1:{port}")),
            "{}",
            e.detail
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_reported_with_resource_and_endpoint() {
    let stack = stack();
    let mut settings = kube_settings(stack);
    settings.token = Some("not-the-token".into());
    let server = settings.host.clone().unwrap();
    let data = provider_data(settings);
    let planned = plan_create(&AgentPolicy, json!({"namespace": "team-a"}));
    let d = AgentPolicy.create(&data, &planned).await.unwrap_err();
    let e = &d.0[0];
    assert_eq!(
        e.summary,
        "Kubernetes API rejected the credentials for agentplane_agent_policy \"default\""
    );
    assert!(
        e.detail.contains(&server) && e.detail.contains("401"),
        "{}",
        e.detail
    );
    let d = Platform
        .read(&data, &Platform.import_state("team-a").unwrap())
        .await
        .unwrap_err();
    assert!(
        d.0[0].summary.contains("agentplane_platform \"team-a\""),
        "{d}"
    );
}

// ---------------------------------------------------------------------------------------------
// OpenTofu / Terraform
// ---------------------------------------------------------------------------------------------

/// The knobs the lifecycle turns.
#[derive(Clone)]
struct Knobs {
    tag: &'static str,
    max_replicas: i64,
    revoked: bool,
    second_key: bool,
    suspend: bool,
    device: String,
    policy: String,
    policy_force: bool,
}

/// Kubernetes namespace of a workspace: its per-test prefix (see `common::Workspace`).
impl Workspace {
    fn ns(&self) -> &str {
        &self.prefix
    }

    /// The provider block for moto and the stack's kube-apiserver reached at `kube_host`.
    fn provider_block(&self, kube_host: &str) -> String {
        let token = env(self.stack, "AGENTPLANE_KUBE_TOKEN");
        let ca = env(self.stack, "AGENTPLANE_KUBE_CA");
        self.provider_config(&format!(
            r#"  kubernetes {{
    host                   = "{kube_host}"
    token                  = "{token}"
    cluster_ca_certificate = file("{ca}")
  }}
"#
        ))
    }

    fn config(&self, k: &Knobs) {
        let server = env(self.stack, "AGENTPLANE_KUBE_SERVER");
        let ns = self.ns();
        let key2 = if k.second_key {
            format!("  public_key {{\n    id  = \"k2\"\n    key = \"{KEY2}\"\n  }}\n")
        } else {
            String::new()
        };
        let tf = format!(
            r#"{provider}
resource "agentplane_platform" "p" {{
  namespace         = "{ns}"
  image             = "example.com/agentplane:{tag}"
  queue_url         = "http://127.0.0.1:5000/123456789012/{ns}-tasks"
  dlq_url           = "http://127.0.0.1:5000/123456789012/{ns}-tasks-dlq"
  region            = "{TEST_REGION}"
  kms_key_arn       = "arn:aws:kms:us-east-1:123456789012:key/test"
  operator_replicas = 1
  worker_secret_names = ["openai-api-key"]
  worker_service_account_annotations = {{
    "eks.amazonaws.com/role-arn" = "arn:aws:iam::123456789012:role/worker"
  }}

  model_tier {{
    name                       = "large"
    endpoint_kind              = "openai"
    endpoint                   = "https://api.openai.com/v1"
    model                      = "gpt-4.1"
    price_per_1k_input_micros  = 2000
    price_per_1k_output_micros = 8000
    privacy_levels             = ["public"]
    secret_ref {{
      name = "openai-api-key"
      key  = "token"
    }}
  }}
  model_tier {{
    name          = "dev"
    endpoint_kind = "builtin"
    endpoint      = "builtin:echo"
  }}
}}

resource "agentplane_keda_scaler" "s" {{
  namespace    = agentplane_platform.p.namespace
  queue_url    = agentplane_platform.p.queue_url
  aws_region   = "{TEST_REGION}"
  max_replicas = {max}
}}

resource "agentplane_edge_device" "d" {{
  namespace       = agentplane_platform.p.namespace
  name            = "{device}"
  owner           = "alice"
  allowed_intents = ["summarize"]
  revoked         = {revoked}
  public_key {{
    id        = "k1"
    key       = "{KEY1}"
    not_after = "2030-01-01T00:00:00Z"
  }}
{key2}}}

resource "agentplane_agent_policy" "pol" {{
  namespace = agentplane_platform.p.namespace
  name      = "{policy}"
  suspend   = {suspend}
  force     = {force}
  approvers = ["alice"]
  intent {{
    type = "summarize"
    rate_limit {{
      scope          = "device"
      requests       = 10
      period_seconds = 60
    }}
  }}
  intent {{
    type              = "deploy"
    requires_approval = true
    privacy_levels    = ["private"]
    on_rate_limit     = "Hold"
  }}
  model {{
    name          = "dev"
    endpoint_kind = "builtin"
    endpoint      = "builtin:echo"
  }}
  budget {{
    scope        = "user"
    limit_micros = 5000000
    period       = "Day"
  }}
}}

output "gateway_service" {{ value = agentplane_platform.p.gateway_service }}
output "object_count" {{ value = length(agentplane_platform.p.objects) }}
"#,
            provider = self.provider_block(&server),
            tag = k.tag,
            max = k.max_replicas,
            device = k.device,
            revoked = k.revoked,
            policy = k.policy,
            suspend = k.suspend,
            force = k.policy_force,
        );
        std::fs::write(self.dir.path().join("main.tf"), tf).unwrap();
    }
}

fn lifecycle(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "kube");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kc = rt.block_on(async {
        let c = ws.stack.kube_client().await.unwrap();
        install_keda(&c).await;
        c
    });
    let ns = ws.ns().to_owned();
    let mut k = Knobs {
        tag: "1.0.0",
        max_replicas: 10,
        revoked: false,
        second_key: false,
        suspend: false,
        device: "laptop-1".into(),
        policy: "default".into(),
        policy_force: false,
    };
    ws.config(&k);
    ws.ok(&["init", "-no-color", "-input=false"]);
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("4 to add"), "{plan}");
    ws.apply();
    ws.assert_empty_plan("apply");

    // The negotiated protocol is the one asked for.
    let log = std::fs::read_to_string(ws.dir.path().join("client.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("protocol={protocol}")),
        "provider log does not show protocol {protocol}"
    );

    assert_eq!(
        ws.output("gateway_service"),
        format!("https://agentplane-gateway.{ns}.svc:443")
    );
    let (dev, pol, so) = rt.block_on(async {
        (
            get(
                &kc,
                "agentplane.dev/v1alpha1",
                "EdgeDevice",
                &ns,
                "laptop-1",
            )
            .await
            .unwrap(),
            get(
                &kc,
                "agentplane.dev/v1alpha1",
                "AgentPolicy",
                &ns,
                "default",
            )
            .await
            .unwrap(),
            get(
                &kc,
                "keda.sh/v1alpha1",
                "ScaledObject",
                &ns,
                "agentplane-worker",
            )
            .await
            .unwrap(),
        )
    });
    assert_eq!(dev["spec"]["publicKeys"][0]["key"], KEY1);
    assert_eq!(dev["spec"]["allowedIntents"], json!(["summarize"]));
    assert_eq!(pol["spec"]["intents"][1]["requiresApproval"], true);
    assert_eq!(pol["spec"]["budgets"][0]["limitMicros"], 5_000_000);
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["queueURL"],
        format!("http://127.0.0.1:5000/123456789012/{ns}-tasks")
    );
    for o in [&dev, &pol, &so] {
        assert_eq!(o["metadata"]["managedFields"][0]["manager"], FIELD_MANAGER);
        assert_eq!(o["metadata"]["managedFields"][0]["operation"], "Apply");
    }

    // In place: a new image, scaler bounds, revocation plus a second key, the kill switch.
    k.tag = "1.1.0";
    k.max_replicas = 20;
    k.revoked = true;
    k.second_key = true;
    k.suspend = true;
    ws.config(&k);
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("0 to add, 4 to change, 0 to destroy"),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("in-place update");
    rt.block_on(async {
        let d = get(
            &kc,
            "agentplane.dev/v1alpha1",
            "EdgeDevice",
            &ns,
            "laptop-1",
        )
        .await
        .unwrap();
        assert_eq!(d["spec"]["revoked"], true);
        assert_eq!(d["spec"]["publicKeys"].as_array().unwrap().len(), 2);
        let w = get(&kc, "apps/v1", "Deployment", &ns, "agentplane-worker")
            .await
            .unwrap();
        assert_eq!(
            w["spec"]["template"]["spec"]["containers"][0]["image"],
            "example.com/agentplane:1.1.0"
        );
    });

    // ForceNew: renaming the device and the policy replaces them.
    k.device = "laptop-2".into();
    k.policy = "strict".into();
    ws.config(&k);
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_edge_device.d must be replaced"),
        "{plan}"
    );
    assert!(
        plan.contains("agentplane_agent_policy.pol must be replaced"),
        "{plan}"
    );
    assert!(
        plan.contains("2 to add, 0 to change, 2 to destroy"),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("replacement");
    rt.block_on(async {
        assert!(
            get(
                &kc,
                "agentplane.dev/v1alpha1",
                "EdgeDevice",
                &ns,
                "laptop-1"
            )
            .await
            .is_none()
        );
        assert!(
            get(
                &kc,
                "agentplane.dev/v1alpha1",
                "AgentPolicy",
                &ns,
                "default"
            )
            .await
            .is_none()
        );
    });

    // Import every resource back after forgetting it.
    for (addr, id) in [
        ("agentplane_platform.p", ns.clone()),
        (
            "agentplane_keda_scaler.s",
            format!("{ns}/agentplane-worker"),
        ),
        ("agentplane_edge_device.d", format!("{ns}/laptop-2")),
        ("agentplane_agent_policy.pol", format!("{ns}/strict")),
    ] {
        ws.ok(&["state", "rm", "-no-color", addr]);
        ws.ok(&["import", "-no-color", "-input=false", addr, &id]);
    }
    ws.assert_empty_plan("import");

    // Out-of-band deletes: the device, policy and scaler plan as created; a deleted Deployment
    // plans as an in-place update of the platform that names it.
    rt.block_on(async {
        for (av, kind, name) in [
            ("agentplane.dev/v1alpha1", "EdgeDevice", "laptop-2"),
            ("agentplane.dev/v1alpha1", "AgentPolicy", "strict"),
            ("keda.sh/v1alpha1", "ScaledObject", "agentplane-worker"),
            ("apps/v1", "Deployment", "agentplane-gateway"),
        ] {
            api(&kc, av, kind, Some(&ns))
                .delete(name, &Default::default())
                .await
                .unwrap();
        }
    });
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    for r in [
        "agentplane_edge_device.d",
        "agentplane_agent_policy.pol",
        "agentplane_keda_scaler.s",
    ] {
        assert!(plan.contains(&format!("{r} will be created")), "{plan}");
    }
    assert!(
        plan.contains("agentplane_platform.p will be updated in-place"),
        "{plan}"
    );
    assert!(
        plan.contains(&format!(
            "Deployment {ns}/agentplane-gateway: deleted outside Terraform"
        )),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("recreate");

    // Someone else takes the kill switch with their own field manager: the plan puts it back,
    // the apply refuses to overwrite silently, and `force = true` takes it over.
    rt.block_on(intrude(
        &kc,
        "ops-console",
        &json!({
            "apiVersion": "agentplane.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "strict", "namespace": ns}, "spec": {"suspend": false},
        }),
    ));
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("suspend") && plan.contains("false -> true"),
        "{plan}"
    );
    let out = ws.run(&["apply", "-no-color", "-input=false", "-auto-approve"]);
    assert!(!out.status.success(), "apply over a conflict must fail");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Field manager conflict on agentplane_agent_policy \"strict\""),
        "{text}"
    );
    assert!(
        text.contains(".spec.suspend") && text.contains("\"ops-console\""),
        "{text}"
    );
    k.policy_force = true;
    ws.config(&k);
    ws.apply();
    ws.assert_empty_plan("forced apply");

    // Destroy leaves nothing behind (the namespace is terminating: no controller deletes it
    // here, but every object in it is gone; CRDs stay by default).
    let out = ws.ok(&["destroy", "-no-color", "-input=false", "-auto-approve"]);
    assert!(out.contains("4 destroyed"), "{out}");
    rt.block_on(async {
        for (av, kind, name) in [
            ("agentplane.dev/v1alpha1", "EdgeDevice", "laptop-2"),
            ("agentplane.dev/v1alpha1", "AgentPolicy", "strict"),
            ("keda.sh/v1alpha1", "ScaledObject", "agentplane-worker"),
            (
                "keda.sh/v1alpha1",
                "TriggerAuthentication",
                "agentplane-sqs",
            ),
            ("apps/v1", "Deployment", "agentplane-operator"),
            ("apps/v1", "Deployment", "agentplane-worker"),
            ("apps/v1", "Deployment", "agentplane-gateway"),
            ("v1", "ConfigMap", "agentplane-models"),
            ("v1", "Secret", "agentplane-join-tokens"),
            ("v1", "ServiceAccount", "agentplane-worker"),
            ("rbac.authorization.k8s.io/v1", "Role", "agentplane-gateway"),
            ("v1", "Service", "agentplane-gateway"),
            ("policy/v1", "PodDisruptionBudget", "agentplane-worker"),
        ] {
            assert!(
                get(&kc, av, kind, &ns, name).await.is_none(),
                "{kind} {name} left after destroy"
            );
        }
        let n = api(&kc, "v1", "Namespace", None).get(&ns).await.unwrap();
        assert!(terraform_provider_agentplane::kube::terminating(
            &serde_json::to_value(n).unwrap()
        ));
    });
}

impl Workspace {
    /// A platform alone (no gateway, one operator replica) with `audit` as extra attribute lines.
    fn platform_only(&self, audit: &str) {
        let server = env(self.stack, "AGENTPLANE_KUBE_SERVER");
        let ns = self.ns();
        let tf = format!(
            r#"{provider}
resource "agentplane_platform" "p" {{
  namespace         = "{ns}"
  image             = "example.com/agentplane:1.0.0"
  queue_url         = "http://127.0.0.1:5000/123456789012/{ns}-tasks"
  dlq_url           = "http://127.0.0.1:5000/123456789012/{ns}-tasks-dlq"
  region            = "{TEST_REGION}"
  operator_replicas = 1
  gateway_enabled   = false
{audit}}}
"#,
            provider = self.provider_block(&server),
        );
        std::fs::write(self.dir.path().join("main.tf"), tf).unwrap();
    }
}

/// The operator's workload kinds in `ns`: which of Deployment and StatefulSet exist.
async fn operator_kinds(kc: &kube::Client, ns: &str) -> (Option<Json>, Option<Json>) {
    (
        get(kc, "apps/v1", "Deployment", ns, "agentplane-operator").await,
        get(kc, "apps/v1", "StatefulSet", ns, "agentplane-operator").await,
    )
}

fn claim_of(sts: &Json) -> &Json {
    &sts["spec"]["volumeClaimTemplates"][0]["spec"]
}

/// The operator's audit log through OpenTofu against the real kube-apiserver: turning it on
/// replaces the operator Deployment by a StatefulSet in one in-place update (and off, the
/// reverse); a size the API server respells (`1.5Gi` is stored as `1536Mi`) plans empty; import
/// reads the audit inputs back; a storage change while the StatefulSet exists is refused at plan
/// with the reason and the way out, and goes through once the StatefulSet is gone.
#[test]
fn tofu_operator_audit_switches_kind_and_guards_its_storage() {
    let ws = Workspace::new("tofu", 6, "audit");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kc = rt.block_on(ws.stack.kube_client()).unwrap();
    let ns = ws.ns().to_owned();
    let key = "arn:aws:kms:us-east-1:123456789012:key/audit";
    let audit = |size: &str| {
        format!(
            "  operator_audit_enabled       = true\n  operator_audit_kms_key_arn   = \"{key}\"\n  operator_audit_storage_size  = \"{size}\"\n  operator_audit_storage_class = \"standard\"\n"
        )
    };

    ws.platform_only("");
    ws.ok(&["init", "-no-color", "-input=false"]);
    ws.apply();
    ws.assert_empty_plan("apply without the audit log");
    let (d, sts) = rt.block_on(operator_kinds(&kc, &ns));
    assert!(d.is_some() && sts.is_none(), "a Deployment, no StatefulSet");

    // On: one in-place update swaps the kinds.
    ws.platform_only(&audit("1.5Gi"));
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_platform.p will be updated in-place")
            && plan.contains(&format!("\"StatefulSet {ns}/agentplane-operator\""))
            && plan.contains("0 to add, 1 to change, 0 to destroy"),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("enabling the audit log");
    let (d, sts) = rt.block_on(operator_kinds(&kc, &ns));
    assert!(d.is_none(), "the operator Deployment must be gone");
    let sts = sts.expect("the operator StatefulSet");
    assert_eq!(
        sts["metadata"]["managedFields"][0]["manager"],
        FIELD_MANAGER
    );
    assert_eq!(sts["spec"]["serviceName"], "agentplane-operator-metrics");
    let env: BTreeMap<&str, &str> = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(
        env["AGENTPLANE_AUDIT_ORIGIN"],
        format!("agentplane.dev/audit/{ns}/$(AGENTPLANE_POD_NAME)")
    );
    assert_eq!(
        env["AGENTPLANE_AUDIT_LOG"],
        "/var/lib/agentplane/audit/audit.sqlite"
    );
    assert_eq!(env["AGENTPLANE_AUDIT_KMS_KEY_ID"], key);
    assert!(!env.contains_key("AGENTPLANE_AUDIT_KEY_FILE"));
    assert_eq!(claim_of(&sts)["storageClassName"], "standard");
    assert_eq!(
        claim_of(&sts)["resources"]["requests"]["storage"],
        "1536Mi",
        "the API server's spelling, which must not plan a change"
    );

    // Import reads the audit inputs back. It cannot know the configuration's spelling of the
    // size, so it takes the API server's, and the plan shows the one no-op update to `1.5Gi`
    // (no storage error: it is the same amount); after it, the plan is empty again.
    ws.ok(&["state", "rm", "-no-color", "agentplane_platform.p"]);
    ws.ok(&[
        "import",
        "-no-color",
        "-input=false",
        "agentplane_platform.p",
        &ns,
    ]);
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    let changed: Vec<&str> = plan
        .lines()
        .filter(|l| l.trim_start().starts_with('~') || l.trim_start().starts_with('+'))
        .collect();
    assert_eq!(
        changed,
        vec![
            "  ~ update in-place",
            "  ~ resource \"agentplane_platform\" \"p\" {",
            "      ~ operator_audit_storage_size  = \"1536Mi\" -> \"1.5Gi\"",
        ],
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("import of the audited platform");

    // A new size while the StatefulSet exists: refused at plan, nothing touched.
    ws.platform_only(&audit("2Gi"));
    let text = ws.fails(&["plan", "-no-color", "-input=false"]);
    assert!(
        text.contains("Audit storage cannot change in place")
            && text.contains("operator_audit_storage_size")
            && text.contains("--cascade=orphan"),
        "{text}"
    );
    let (_, sts) = rt.block_on(operator_kinds(&kc, &ns));
    assert_eq!(
        claim_of(&sts.unwrap())["resources"]["requests"]["storage"],
        "1536Mi"
    );

    // Once the StatefulSet is gone (a user runs `kubectl delete --cascade=orphan`; here, without
    // a garbage collector to clear the orphan finalizer, a plain delete stands for it), the
    // refresh sees it missing and the new size recreates it.
    rt.block_on(async {
        api(&kc, "apps/v1", "StatefulSet", Some(&ns))
            .delete("agentplane-operator", &Default::default())
            .await
            .unwrap();
    });
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains(&format!(
            "StatefulSet {ns}/agentplane-operator: deleted outside Terraform"
        )),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("recreating the StatefulSet with the new size");
    let (_, sts) = rt.block_on(operator_kinds(&kc, &ns));
    assert_eq!(
        claim_of(&sts.unwrap())["resources"]["requests"]["storage"],
        "2Gi"
    );

    // Off: the Deployment comes back and the StatefulSet goes.
    ws.platform_only("");
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("0 to add, 1 to change, 0 to destroy"),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("disabling the audit log");
    let (d, sts) = rt.block_on(operator_kinds(&kc, &ns));
    assert!(
        d.is_some() && sts.is_none(),
        "a Deployment again, no StatefulSet"
    );

    let out = ws.ok(&["destroy", "-no-color", "-input=false", "-auto-approve"]);
    assert!(out.contains("1 destroyed"), "{out}");
}

/// A closed port in the provider's `kubernetes` block reaches the user as a diagnostic naming
/// the resource and the endpoint.
fn unreachable_through_the_client(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "closed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tf = format!(
        "{}\nresource \"agentplane_edge_device\" \"d\" {{\n  namespace = \"team-a\"\n  name = \"phone\"\n  owner = \"alice\"\n  public_key {{\n    id = \"k1\"\n    key = \"{KEY1}\"\n  }}\n}}\n",
        ws.provider_block(&format!("https://127.0.0.1:{port}"))
    );
    std::fs::write(ws.path().join("main.tf"), tf).unwrap();
    ws.init();
    let text = ws.fails(&["apply", "-no-color", "-input=false", "-auto-approve"]);
    assert!(
        text.contains("Cannot reach the Kubernetes API for agentplane_edge_device \"phone\""),
        "{text}"
    );
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

#[test]
fn tofu_protocol6_lifecycle() {
    lifecycle("tofu", 6);
}

#[test]
fn terraform_protocol5_lifecycle() {
    lifecycle("terraform", 5);
}

#[test]
fn tofu_unreachable_api_diagnostic() {
    unreachable_through_the_client("tofu", 6);
}

#[test]
fn terraform_unreachable_api_diagnostic() {
    unreachable_through_the_client("terraform", 5);
}

/// `examples/terraform/local` as a user runs it (kubeconfig access, moto for AWS): the whole
/// platform is created, the second plan is empty, the outputs the edge installer needs are
/// there, and destroy leaves nothing behind.
fn example_local(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "example");
    let (stack, dir) = (ws.stack, ws.path());
    let example = agentplane_testsupport::repo_root().join("examples/terraform/local");
    for f in std::fs::read_dir(&example).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|x| x == "tf") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let name = unique(&format!("ex-{client}"));
    std::fs::write(
        dir.join("terraform.tfvars"),
        format!(
            "aws_endpoint = \"{}\"\nkubeconfig = \"{}\"\nname = \"{name}\"\n",
            stack.aws_endpoint(),
            stack.kubeconfig_path().display()
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kc = rt.block_on(async {
        let c = stack.kube_client().await.unwrap();
        install_keda(&c).await;
        c
    });
    ws.ok(&["init", "-no-color", "-input=false"]);
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("6 to add"), "{plan}");
    ws.apply();
    ws.assert_empty_plan("applying the example");

    assert_eq!(
        ws.output("gateway_url"),
        format!("https://agentplane-gateway.{name}.svc:443")
    );
    let howto = ws.output("join_token_instruction");
    assert!(
        howto.contains(&format!(
            "kubectl -n {name} create secret generic {name}-gateway-credentials"
        )),
        "{howto}"
    );
    assert!(howto.contains("agentplane-edge install"), "{howto}");
    let queue_url = ws.output("queue_url");
    rt.block_on(async {
        let w = get(&kc, "apps/v1", "Deployment", &name, "agentplane-worker")
            .await
            .unwrap();
        let env = w["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
        assert!(
            env.contains(&queue_url),
            "worker env lacks the queue URL: {env}"
        );
        let so = get(
            &kc,
            "keda.sh/v1alpha1",
            "ScaledObject",
            &name,
            "agentplane-worker",
        )
        .await
        .unwrap();
        assert_eq!(
            so["spec"]["triggers"][0]["metadata"]["queueURL"],
            queue_url.as_str()
        );
        assert!(
            get(
                &kc,
                "agentplane.dev/v1alpha1",
                "EdgeDevice",
                &name,
                "demo-device"
            )
            .await
            .is_some()
        );
        let pol = get(
            &kc,
            "agentplane.dev/v1alpha1",
            "AgentPolicy",
            &name,
            "default",
        )
        .await
        .expect("the example's AgentPolicy");
        assert_eq!(
            pol["spec"]["circuitBreaker"],
            json!({"windowSeconds": 300, "failures": 5, "minTasks": 5})
        );
    });

    let out = ws.ok(&["destroy", "-no-color", "-input=false", "-auto-approve"]);
    assert!(out.contains("6 destroyed"), "{out}");
    rt.block_on(async {
        let sqs = aws_sdk_sqs::Client::new(&stack.aws_sdk_config().await);
        let left = sqs
            .list_queues()
            .queue_name_prefix(&name)
            .send()
            .await
            .unwrap();
        assert!(
            left.queue_urls().is_empty(),
            "queues left: {:?}",
            left.queue_urls()
        );
        for (av, kind, obj) in [
            ("apps/v1", "Deployment", "agentplane-worker"),
            ("keda.sh/v1alpha1", "ScaledObject", "agentplane-worker"),
            ("agentplane.dev/v1alpha1", "EdgeDevice", "demo-device"),
            ("agentplane.dev/v1alpha1", "AgentPolicy", "default"),
            ("v1", "ConfigMap", "agentplane-models"),
        ] {
            assert!(
                get(&kc, av, kind, &name, obj).await.is_none(),
                "{kind} {obj} left after destroy"
            );
        }
    });
}

#[test]
fn tofu_applies_the_local_example() {
    example_local("tofu", 6);
}

#[test]
fn terraform_applies_the_local_example() {
    example_local("terraform", 5);
}

// ---------------------------------------------------------------------------------------------
// The agentic policy (issue 14)
// ---------------------------------------------------------------------------------------------

/// A policy config (as the library receives it) setting every agentic block.
fn agentic_policy_config(ns: &str) -> Json {
    let secret = json!([{"name": "mcp", "key": "token"}]);
    json!({
        "namespace": ns,
        "max_steps": 32,
        "intent": [{"type": "research", "max_steps": 8, "tool": [
            {"server": "files", "name": "echo",
             "rate_limit": [{"scope": "user", "requests": 3, "period_seconds": 60}]},
        ]}],
        "mcp_server": [
            {"name": "files", "stdio": [{"command": "npx", "args": ["-y"], "env": [
                {"name": "LOG_LEVEL", "value": "debug"},
                {"name": "API_TOKEN", "secret_ref": secret},
            ]}]},
            {"name": "search", "http": [{"url": "https://search.example.com/mcp", "header": [
                {"name": "Authorization", "secret_ref": secret},
            ]}]},
        ],
        "circuit_breaker": [{"window_seconds": 300, "failure_percent": 50}],
        "rego": [{"module": [
            {"name": "admission.rego", "inline": "package agentplane"},
            {"name": "tools.rego", "config_map_ref": [{"name": "rego", "key": "tools.rego"}]},
        ]}],
        "edge": [{"regulated": "refuse"}],
    })
}

/// The provider's plan-time checks and the real API server's CRD agree: each config the
/// provider refuses (at the path named here) is also refused by a strict server-side dry run of
/// the manifest it would have sent, and the full config and a tool of an undeclared server (a
/// warning only) are accepted by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentic_checks_agree_with_the_api_server() {
    let stack = stack();
    let client = stack.kube_client().await.unwrap();
    agentplane_crds(&client).await;
    let ns = unique("agentic-crd");
    create_namespace(&client, &ns).await;
    let good = agentic_policy_config(&ns);
    let errors = |d: &Diagnostics| -> Vec<String> {
        d.0.iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.path.as_ref().map(|p| p.to_string()).unwrap_or_default())
            .collect()
    };

    let accepted = |config: &Json| {
        let (planned, d) = plan_unchecked(&AgentPolicy, config);
        (errors(&d), planned, d)
    };
    let (errs, planned, _) = accepted(&good);
    assert!(errs.is_empty(), "{errs:?}");
    let m = manifest(&planned).unwrap();
    strict_dry_run(&client, &m)
        .await
        .unwrap_or_else(|e| panic!("the API server refuses the full agentic policy: {e}"));
    let mut undeclared = good.clone();
    undeclared["intent"][0]["tool"][0]["server"] = json!("nowhere");
    let (errs, planned, d) = accepted(&undeclared);
    assert!(errs.is_empty() && d.0.len() == 1, "{d}");
    strict_dry_run(&client, &manifest(&planned).unwrap())
        .await
        .unwrap_or_else(|e| panic!("a tool of an undeclared server is refused: {e}"));

    type Edit = fn(&mut Json);
    let cases: [(&str, Edit); 16] = [
        ("max_steps", |c| c["max_steps"] = json!(257)),
        ("intent[0].max_steps", |c| {
            c["intent"][0]["max_steps"] = json!(0)
        }),
        ("mcp_server[0].http", |c| {
            c["mcp_server"][0]["http"] = json!([{"url": "https://files.example.com/mcp"}])
        }),
        ("mcp_server[1].name", |c| {
            c["mcp_server"][1]["http"] = json!([])
        }),
        ("mcp_server[1].http[0].url", |c| {
            c["mcp_server"][1]["http"][0]["url"] = json!("http://search.example.com/mcp")
        }),
        ("mcp_server[0].name", |c| {
            c["mcp_server"][0]["name"] = json!("Files_1")
        }),
        ("mcp_server[1].name", |c| {
            c["mcp_server"][1]["name"] = json!("files")
        }),
        ("mcp_server[0].max_tools", |c| {
            c["mcp_server"][0]["max_tools"] = json!(4097)
        }),
        ("mcp_server[0].stdio[0].env[0].secret_ref", |c| {
            c["mcp_server"][0]["stdio"][0]["env"][0]["secret_ref"] =
                json!([{"name": "mcp", "key": "log"}])
        }),
        ("mcp_server[0].stdio[0].env[1].name", |c| {
            c["mcp_server"][0]["stdio"][0]["env"][1]["name"] = json!("LOG_LEVEL")
        }),
        ("circuit_breaker[0].window_seconds", |c| {
            c["circuit_breaker"][0]["failure_percent"] = Json::Null
        }),
        ("circuit_breaker[0].failure_percent", |c| {
            c["circuit_breaker"][0]["failure_percent"] = json!(101)
        }),
        ("rego[0].query", |c| {
            c["rego"][0]["query"] = json!("agentplane.decision")
        }),
        ("rego[0].module[1].config_map_ref", |c| {
            c["rego"][0]["module"][1]["inline"] = json!("package x")
        }),
        ("rego[0].module[0].name", |c| {
            c["rego"][0]["module"][0]["inline"] = Json::Null
        }),
        ("rego[0].module[1].name", |c| {
            c["rego"][0]["module"][1]["name"] = json!("admission.rego")
        }),
    ];
    for (path, edit) in cases {
        let mut config = good.clone();
        edit(&mut config);
        let (errs, planned, d) = accepted(&config);
        assert!(errs.contains(&path.to_string()), "{path}: {d}");
        let m = manifest(&planned).unwrap();
        match strict_dry_run(&client, &m).await {
            // A duplicate list-map key fails server-side apply's typed patch (a 500 naming it).
            Err(kube::Error::Api(e))
                if e.code == 422 || e.message.contains("duplicate entries for key") => {}
            other => panic!(
                "{path}: the API server did not refuse {}: {other:?}",
                m["spec"]
            ),
        }
    }
    // An unknown route cannot even be encoded as the API type; the API server refuses it too.
    let mut bad = good.clone();
    bad["edge"][0]["regulated"] = json!("bogus");
    assert_eq!(errors(&accepted(&bad).2), vec!["edge[0].regulated"]);
    let mut m = manifest(&plan_create(&AgentPolicy, good.clone())).unwrap();
    m["spec"]["edge"]["regulated"] = json!("bogus");
    let err = strict_dry_run(&client, &m).await.unwrap_err();
    assert!(err.to_string().contains("regulated"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The agentic policy (issue 14) through OpenTofu and Terraform
// ---------------------------------------------------------------------------------------------

/// One bad input of the agentic policy, each something the API server's CRD refuses.
#[derive(Clone, Copy, PartialEq)]
enum AgenticBad {
    None,
    TwoTransports,
    InsecureUrl,
    NoTrigger,
    BothModuleSources,
    BogusRegulated,
}

impl Workspace {
    /// A policy setting every agentic block (and `bad`, if any), in the workspace's namespace;
    /// `force` takes fields over from other field managers.
    fn agentic_config(&self, bad: AgenticBad, force: bool) {
        let server = env(self.stack, "AGENTPLANE_KUBE_SERVER");
        let ns = self.ns();
        let pick = |b: AgenticBad, bad_text: &'static str, good: &'static str| {
            if bad == b { bad_text } else { good }
        };
        let second_transport = pick(
            AgenticBad::TwoTransports,
            "    http {\n      url = \"https://files.example.com/mcp\"\n    }\n",
            "",
        );
        let url = pick(
            AgenticBad::InsecureUrl,
            "http://search.example.com/mcp",
            "https://search.example.com/mcp",
        );
        let triggers = pick(
            AgenticBad::NoTrigger,
            "",
            "    failures     = 5\n    spend_micros = 1000000\n",
        );
        let module_inline = pick(
            AgenticBad::BothModuleSources,
            "      inline = \"package agentplane\"\n",
            "",
        );
        let regulated = pick(AgenticBad::BogusRegulated, "bogus", "local");
        let tf = format!(
            r#"{provider}
resource "agentplane_agent_policy" "pol" {{
  namespace = "{ns}"
  max_steps = 32
  approvers = ["alice"]
  force     = {force}

  intent {{
    type      = "research"
    max_steps = 8
    tool {{
      server = "files"
      name   = "echo"
    }}
    tool {{
      server            = "search"
      name              = "delete"
      requires_approval = true
      rate_limit {{
        scope          = "user"
        requests       = 3
        period_seconds = 60
      }}
    }}
  }}

  mcp_server {{
    name = "files"
    stdio {{
      command = "npx"
      args    = ["-y", "@modelcontextprotocol/server-everything"]
      env {{
        name  = "LOG_LEVEL"
        value = "debug"
      }}
      env {{
        name = "API_TOKEN"
        secret_ref {{
          name = "mcp-files"
          key  = "token"
        }}
      }}
    }}
{second_transport}  }}
  mcp_server {{
    name                 = "search"
    call_timeout_seconds = 5
    max_result_bytes     = 65536
    max_tools            = 16
    http {{
      url = "{url}"
      header {{
        name = "Authorization"
        secret_ref {{
          name = "mcp-search"
          key  = "bearer"
        }}
      }}
    }}
  }}

  circuit_breaker {{
    window_seconds = 300
{triggers}  }}

  rego {{
    module {{
      name   = "admission.rego"
      inline = "package agentplane\n\ndefault decision := {{\"allow\": true}}\n"
    }}
    module {{
      name = "tools.rego"
{module_inline}      config_map_ref {{
        name = "rego"
        key  = "tools.rego"
      }}
    }}
  }}

  edge {{
    regulated = "{regulated}"
  }}
}}
"#,
            provider = self.provider_block(&server),
        );
        std::fs::write(self.dir.path().join("main.tf"), tf).unwrap();
    }
}

/// Every agentic block through a real client against the real kube-apiserver: the AgentPolicy
/// holds each field as configured (secrets as references only), the next plan is empty, hand
/// edits of new fields plan as drift and the apply restores them (a removed block at once,
/// changed values once `force` takes them back from the editor's field manager), and each bad
/// input the CRD would refuse is refused at plan with its attribute path and source line.
fn agentic_policy(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "agentic");
    let ns = ws.ns().to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kc = rt.block_on(async {
        let c = ws.stack.kube_client().await.unwrap();
        agentplane_crds(&c).await;
        create_namespace(&c, &ns).await;
        c
    });
    let live = |kc: &kube::Client| {
        rt.block_on(get(
            kc,
            "agentplane.dev/v1alpha1",
            "AgentPolicy",
            &ns,
            "default",
        ))
        .expect("the AgentPolicy exists")
    };

    ws.agentic_config(AgenticBad::None, false);
    ws.init();
    ws.apply();
    let pol = live(&kc);
    let spec = &pol["spec"];
    assert_eq!(spec["maxSteps"], 32);
    assert_eq!(
        spec["intents"][0]["tools"],
        json!([
            {"server": "files", "name": "echo", "requiresApproval": false},
            {"server": "search", "name": "delete", "requiresApproval": true,
             "rateLimits": [{"scope": "user", "requests": 3, "periodSeconds": 60}]},
        ])
    );
    assert_eq!(spec["intents"][0]["maxSteps"], 8);
    assert_eq!(
        spec["mcpServers"],
        json!([
            {"name": "files", "callTimeoutSeconds": 30, "maxResultBytes": 1_048_576, "maxTools": 256,
             "stdio": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything"],
                       "env": [{"name": "LOG_LEVEL", "value": "debug"},
                               {"name": "API_TOKEN", "secretRef": {"name": "mcp-files", "key": "token"}}]}},
            {"name": "search", "callTimeoutSeconds": 5, "maxResultBytes": 65536, "maxTools": 16,
             "http": {"url": "https://search.example.com/mcp",
                      "headers": [{"name": "Authorization",
                                   "secretRef": {"name": "mcp-search", "key": "bearer"}}]}},
        ])
    );
    assert_eq!(
        spec["circuitBreaker"],
        json!({"windowSeconds": 300, "failures": 5, "spendMicros": 1_000_000, "minTasks": 5})
    );
    assert_eq!(spec["rego"]["query"], "data.agentplane.decision");
    assert_eq!(
        spec["rego"]["modules"][0]["inline"],
        "package agentplane\n\ndefault decision := {\"allow\": true}\n"
    );
    assert_eq!(
        spec["rego"]["modules"][1],
        json!({"name": "tools.rego", "configMapRef": {"name": "rego", "key": "tools.rego"}})
    );
    assert_eq!(spec["edge"], json!({"regulated": "local"}));
    ws.assert_empty_plan("applying every agentic block");

    // Hand edits, as `kubectl edit` sends them (merge patches by another field manager). A
    // removed block is drift the next apply puts back.
    let hand_edit = |patch: Json| {
        rt.block_on(async {
            api(&kc, "agentplane.dev/v1alpha1", "AgentPolicy", Some(&ns))
                .patch(
                    "default",
                    &PatchParams {
                        field_manager: Some("kubectl-edit".into()),
                        ..Default::default()
                    },
                    &Patch::Merge(patch),
                )
                .await
                .unwrap()
        })
    };
    hand_edit(json!({"spec": {"rego": null, "maxSteps": 64}}));
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_agent_policy.pol will be updated in-place")
            && plan.contains("+ rego {")
            && plan.contains("64 -> 32"),
        "{plan}"
    );
    let out = ws.fails(&["apply", "-no-color", "-input=false", "-auto-approve"]);
    assert!(
        out.contains(".spec.maxSteps is owned by field manager \"kubectl-edit\"")
            && !out.contains(".spec.rego"),
        "a changed field is the editor's, a removed one nobody's:\n{out}"
    );

    // Changed values are fields the editor now owns: the apply names them and their manager,
    // and `force = true` takes them back.
    hand_edit(json!({"spec": {
        "edge": {"regulated": "refuse"},
        "circuitBreaker": {"failures": 50},
    }}));
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains(r#""refuse" -> "local""#), "{plan}");
    assert!(plan.contains("50 -> 5"), "{plan}");
    assert!(
        plan.contains("0 to add, 1 to change, 0 to destroy"),
        "{plan}"
    );
    let out = ws.fails(&["apply", "-no-color", "-input=false", "-auto-approve"]);
    for field in [
        ".spec.circuitBreaker.failures",
        ".spec.edge.regulated",
        ".spec.maxSteps",
    ] {
        assert!(
            out.contains(&format!(
                "{field} is owned by field manager \"kubectl-edit\""
            )),
            "{field} in:\n{out}"
        );
    }
    ws.agentic_config(AgenticBad::None, true);
    ws.apply();
    let pol = live(&kc);
    assert_eq!(pol["spec"]["edge"]["regulated"], "local");
    assert_eq!(pol["spec"]["circuitBreaker"]["failures"], 5);
    assert_eq!(pol["spec"]["maxSteps"], 32);
    assert_eq!(
        pol["spec"]["rego"]["modules"].as_array().map(Vec::len),
        Some(2)
    );
    ws.assert_empty_plan("restoring the hand-edited fields");

    // Bad inputs never reach the API server: plan refuses them with the attribute's path, and
    // the client points at the configuration line it comes from.
    for (bad, summary, detail, line) in [
        (
            AgenticBad::TwoTransports,
            "One MCP transport",
            "mcp_server[0] sets both `stdio` and `http`",
            "http {",
        ),
        (
            AgenticBad::InsecureUrl,
            "Insecure MCP server URL",
            "mcp_server[1].http[0].url: remote MCP servers must use https",
            r#"url = "http://search.example.com/mcp""#,
        ),
        (
            AgenticBad::NoTrigger,
            "Circuit breaker without a trigger",
            "circuit_breaker[0] needs at least one of",
            "window_seconds = 300",
        ),
        (
            AgenticBad::BothModuleSources,
            "One Rego module source",
            "rego[0].module[1] sets both `inline` and `config_map_ref`",
            "config_map_ref {",
        ),
        (
            AgenticBad::BogusRegulated,
            "Invalid value",
            r#"edge[0].regulated must be one of local, cloud, refuse, got "bogus""#,
            r#"regulated = "bogus""#,
        ),
    ] {
        ws.agentic_config(bad, true);
        let text = ws.fails(&["plan", "-no-color", "-input=false"]);
        for want in [summary, detail, line] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
    // Nothing of the refused plans reached the object.
    assert_eq!(live(&kc)["spec"], pol["spec"]);

    ws.agentic_config(AgenticBad::None, true);
    let out = ws.destroy();
    assert!(out.contains("1 destroyed"), "{out}");
    assert!(
        rt.block_on(get(
            &kc,
            "agentplane.dev/v1alpha1",
            "AgentPolicy",
            &ns,
            "default"
        ))
        .is_none()
    );
}

#[test]
fn tofu_agentic_policy_round_trips_and_refuses_bad_input() {
    agentic_policy("tofu", 6);
}

#[test]
fn terraform_agentic_policy_round_trips_and_refuses_bad_input() {
    agentic_policy("terraform", 5);
}
