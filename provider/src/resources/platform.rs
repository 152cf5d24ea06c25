//! `agentplane_platform`: installs the agentplane CRDs and the distributed runtime (operator,
//! workers, gateway, their RBAC, the models ConfigMap, Services) into one namespace by
//! server-side apply — the runtime `charts/agentplane` installs, without Helm. With the audit
//! log on, the operator is a StatefulSet instead of a Deployment; the kind switch is an in-place
//! update, and a change to its immutable volume claim templates is refused at plan.
//!
//! Drift: read maps the live objects back onto the inputs they came from (image, queue URLs,
//! replicas, model tiers...), and for everything else asks the API server, by a dry-run apply
//! of each object, whether applying our intent again would change it. Objects that would
//! change (deleted, edited, or taken over by another field manager) are listed in the computed
//! `drift` attribute, which plans as `[]`, so the plan shows an in-place update that puts them
//! back. A deleted or terminating namespace means the runtime is gone: the resource is removed
//! from state and planned for creation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agentplane_api::policy::ModelTier;
use async_trait::async_trait;
use serde_json::Value as Json;

use super::agent_policy::{
    list_block, model_tier_block, string_list, tier_from_value, tier_to_value, validate_tiers,
};
use super::{label, tags_value};
use crate::config::ProviderData;
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Type, Validator, Value,
};
use crate::kube::{self as k, Kube, ObjRef};
use crate::platform_manifests::{self as pm, FULLNAME, PlatformSpec};

pub const TYPE: &str = "agentplane_platform";
pub const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/agentplane/agentplane:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_AUDIT_STORAGE: &str = "1Gi";
/// The attributes that become the operator StatefulSet's volume claim template.
const AUDIT_STORAGE_ATTRS: [&str; 2] = [
    "operator_audit_storage_size",
    "operator_audit_storage_class",
];
/// How long CRDs get to become Established after they are applied.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Platform;

fn computed_list(name: &'static str) -> Attribute {
    Attribute {
        ty: Type::list(Type::String),
        ..Attribute::string(name)
    }
    .computed()
}

fn schema_block() -> Block {
    Block::new("The agentplane runtime in one namespace: the CRDs (AgentTask, EdgeDevice, AgentPolicy), the operator, worker and gateway Deployments (the operator a StatefulSet with a volume per replica when it keeps the audit log) with the runtime's environment contract, least-privilege RBAC, the `agentplane-models` ConfigMap, the join-tokens Secret, Services and PodDisruptionBudgets — the objects `charts/agentplane` installs, applied by server-side apply as field manager `agentplane-terraform`.")
        .attr(Attribute::string("id").computed().describe("The namespace."))
        .attr(Attribute::string("namespace").required().force_new().validate(Validator::LenRange(1, 63)).describe("Namespace the runtime runs in and acts on. Changing it replaces the platform."))
        .attr(Attribute::bool("create_namespace").default(Value::Bool(true)).describe("Create (and on destroy delete) the namespace. When false it must already exist and is left alone."))
        .attr(Attribute::string("image").default(Value::string(DEFAULT_IMAGE)).describe("Runtime image `repository:tag` (or `repository@sha256:...`)."))
        .attr(Attribute::string("image_pull_policy").default(Value::string("IfNotPresent")).validate(Validator::OneOf(&["Always", "IfNotPresent", "Never"])).describe("`Always`, `IfNotPresent` or `Never`."))
        .attr(Attribute::string("queue_url").required().describe("SQS task queue URL (`AGENTPLANE_QUEUE_URL`), e.g. `agentplane_queue.tasks.url`."))
        .attr(Attribute::string("dlq_url").required().describe("Dead-letter queue URL (`AGENTPLANE_DLQ_URL`)."))
        .attr(Attribute::bool("queue_fifo").default(Value::Bool(false)).describe("The queue is FIFO (`AGENTPLANE_QUEUE_FIFO`)."))
        .attr(Attribute::number("visibility_timeout_seconds").default(Value::int(300)).validate(Validator::IntRange(0, 43_200)).describe("Visibility the workers extend while working, 0-43200."))
        .attr(Attribute::number("max_receive_count").default(Value::int(5)).validate(Validator::IntRange(1, 1000)).describe("Deliveries before the DLQ; must equal the queue's `max_receive_count`."))
        .attr(Attribute::string("region").optional().describe("AWS region of the queue and key (`AWS_REGION`); unset lets the SDK find it."))
        .attr(Attribute::string("aws_endpoint_url").optional().describe("`AWS_ENDPOINT_URL`, for emulators only."))
        .attr(Attribute::string("kms_key_arn").optional().describe("KMS key that envelope-encrypts third-party secrets (`AGENTPLANE_KMS_KEY_ID`)."))
        .attr(Attribute::string("log_level").default(Value::string("info")).describe("`RUST_LOG` of every component."))
        .attr(Attribute::string("log_format").default(Value::string("json")).validate(Validator::OneOf(&["json", "text"])).describe("`json` or `text`."))
        .attr(Attribute::number("operator_replicas").default(Value::int(2)).validate(Validator::IntRange(0, 100)).describe("Operator replicas (one leader at a time)."))
        .attr(Attribute::number("operator_concurrency").default(Value::int(16)).validate(Validator::IntRange(1, 1024)).describe("Reconciles at once (`AGENTPLANE_CONCURRENCY`)."))
        .attr(Attribute::bool("operator_audit_enabled").default(Value::Bool(false)).describe("Keep the operator's tamper-evident audit log: the operator runs as a StatefulSet with a volume per replica (one log per replica, origin `agentplane.dev/audit/<namespace>/<pod>`) instead of a Deployment. Switching it deletes one kind and creates the other; the volumes are kept."))
        .attr(Attribute::string("operator_audit_kms_key_arn").optional().describe("KMS key (KeySpec ECC_NIST_P256, KeyUsage SIGN_VERIFY) that signs the audit checkpoints (`AGENTPLANE_AUDIT_KMS_KEY_ID`); the operator's role needs `kms:Sign` and `kms:GetPublicKey` on it. Unset: a local Ed25519 key on each replica's volume."))
        .attr(Attribute::string("operator_audit_storage_size").default(Value::string(DEFAULT_AUDIT_STORAGE)).describe("Size of each operator replica's audit volume, a Kubernetes quantity (e.g. `1Gi`). Cannot change while the StatefulSet exists (its volume claim templates are immutable)."))
        .attr(Attribute::string("operator_audit_storage_class").optional().describe("StorageClass of the audit volumes; unset uses the cluster's default. Cannot change while the StatefulSet exists."))
        .attr(Attribute::number("worker_replicas").optional().validate(Validator::IntRange(0, 1000)).describe("Worker replicas. Leave unset when `agentplane_keda_scaler` (or another autoscaler) scales the workers: the field is then not ours and never fought over."))
        .attr(Attribute::number("worker_concurrency").default(Value::int(4)).validate(Validator::IntRange(1, 1024)).describe("Tasks per worker pod (`AGENTPLANE_WORKERS`)."))
        .attr(string_list("worker_secret_names").optional().describe("The only Secrets the workers may `get` (third-party API keys)."))
        .attr(Attribute::bool("gateway_enabled").default(Value::Bool(true)).describe("Run the HTTPS gateway edge devices submit to."))
        .attr(Attribute::number("gateway_replicas").default(Value::int(2)).validate(Validator::IntRange(0, 100)).describe("Gateway replicas."))
        .attr(Attribute::number("gateway_port").default(Value::int(8443)).validate(Validator::IntRange(1, 65_535)).describe("HTTPS port in the gateway pod."))
        .attr(Attribute::string("gateway_service_type").default(Value::string("ClusterIP")).validate(Validator::OneOf(&["ClusterIP", "NodePort", "LoadBalancer"])).describe("Type of the gateway Service."))
        .attr(Attribute::number("gateway_service_port").default(Value::int(443)).validate(Validator::IntRange(1, 65_535)).describe("Port of the gateway Service."))
        .attr(Attribute::string("gateway_tls_secret_name").default(Value::string("agentplane-gateway-tls")).describe("`kubernetes.io/tls` Secret the gateway serves (e.g. from cert-manager)."))
        .attr(Attribute::string("gateway_credentials_secret").optional().describe("Secret whose keys become gateway env vars (`AGENTPLANE_APPROVERS`, `AGENTPLANE_JOIN_TOKEN`)."))
        .attr(Attribute::string_map("operator_service_account_annotations").optional().describe("Annotations of the operator ServiceAccount, e.g. `eks.amazonaws.com/role-arn`."))
        .attr(Attribute::string_map("worker_service_account_annotations").optional().describe("Annotations of the worker ServiceAccount, e.g. `eks.amazonaws.com/role-arn`."))
        .attr(Attribute::string_map("gateway_service_account_annotations").optional().describe("Annotations of the gateway ServiceAccount."))
        .attr(Attribute::bool("delete_crds").default(Value::Bool(false)).describe("Delete the CRDs on destroy. Off by default: deleting a CRD deletes every AgentTask, EdgeDevice and AgentPolicy in the cluster."))
        .attr(Attribute::bool("force").default(Value::Bool(false)).describe("Take over fields another field manager owns instead of failing with a conflict."))
        .attr(Attribute::bool("crds_established").computed().describe("The three CRDs exist and are Established."))
        .attr(computed_list("objects").describe("Every object applied, as `Kind namespace/name`."))
        .attr(Attribute::string("gateway_service").computed().describe("In-cluster URL of the gateway Service, e.g. `https://agentplane-gateway.agentplane.svc:443`; null without the gateway."))
        .attr(computed_list("drift").describe("Objects that differ from this configuration (deleted, changed, or owned by another field manager). Always `[]` after apply; a non-empty value read from the cluster plans an update that re-applies them."))
        .block(list_block("model_tier", model_tier_block(), 16))
}

fn int(v: &Value, name: &str, default: i64) -> i64 {
    v.get(name).as_i64().unwrap_or(default)
}

fn text(v: &Value, name: &str, default: &str) -> String {
    v.get(name).as_str().unwrap_or(default).to_string()
}

/// The state/planned value as the spec the manifests are rendered from.
pub fn spec_from_value(v: &Value) -> Result<PlatformSpec, String> {
    let tiers = k::items(v.get("model_tier"))
        .iter()
        .map(tier_from_value)
        .collect::<Result<Vec<ModelTier>, _>>()?;
    let annotations = pm::COMPONENTS
        .iter()
        .map(|c| {
            (
                c.to_string(),
                v.get(&format!("{c}_service_account_annotations"))
                    .as_string_map(),
            )
        })
        .collect();
    Ok(PlatformSpec {
        namespace: text(v, "namespace", ""),
        create_namespace: v.get("create_namespace").as_bool().unwrap_or(true),
        image: text(v, "image", DEFAULT_IMAGE),
        image_pull_policy: text(v, "image_pull_policy", "IfNotPresent"),
        queue_url: text(v, "queue_url", ""),
        dlq_url: text(v, "dlq_url", ""),
        queue_fifo: v.get("queue_fifo").as_bool().unwrap_or(false),
        visibility_timeout_seconds: int(v, "visibility_timeout_seconds", 300),
        max_receive_count: int(v, "max_receive_count", 5),
        region: k::opt_str(v.get("region")),
        aws_endpoint_url: k::opt_str(v.get("aws_endpoint_url")),
        kms_key_arn: k::opt_str(v.get("kms_key_arn")),
        model_tiers: tiers,
        log_level: text(v, "log_level", "info"),
        log_format: text(v, "log_format", "json"),
        operator_replicas: int(v, "operator_replicas", 2),
        operator_concurrency: int(v, "operator_concurrency", 16),
        operator_audit: audit_from_value(v),
        worker_replicas: v.get("worker_replicas").as_i64(),
        worker_concurrency: int(v, "worker_concurrency", 4),
        worker_secret_names: k::strings(v.get("worker_secret_names")),
        gateway_enabled: v.get("gateway_enabled").as_bool().unwrap_or(true),
        gateway_replicas: int(v, "gateway_replicas", 2),
        gateway_port: int(v, "gateway_port", 8443),
        gateway_service_type: text(v, "gateway_service_type", "ClusterIP"),
        gateway_service_port: int(v, "gateway_service_port", 443),
        gateway_tls_secret_name: text(v, "gateway_tls_secret_name", "agentplane-gateway-tls"),
        gateway_credentials_secret: k::opt_str(v.get("gateway_credentials_secret")),
        service_account_annotations: annotations,
    })
}

/// The operator's audit log settings, when it keeps one.
fn audit_from_value(v: &Value) -> Option<pm::AuditSpec> {
    (v.get("operator_audit_enabled").as_bool() == Some(true)).then(|| pm::AuditSpec {
        kms_key_arn: k::opt_str(v.get("operator_audit_kms_key_arn")),
        storage_size: text(v, "operator_audit_storage_size", DEFAULT_AUDIT_STORAGE),
        storage_class: k::opt_str(v.get("operator_audit_storage_class")),
    })
}

/// A storage size as the chart's schema accepts it: a quantity in bytes (no milli-units).
fn is_storage_size(s: &str) -> bool {
    k::parse_quantity(s).is_some() && !s.ends_with('m')
}

/// `Kind namespace/name` of every object, as the `objects` attribute lists them.
fn object_labels(manifests: &[Json]) -> Value {
    Value::List(
        manifests
            .iter()
            .filter_map(|m| ObjRef::of(m).ok())
            .map(|r| Value::string(r.label()))
            .collect(),
    )
}

/// Fills the computed attributes that follow from the inputs; leaves them unknown when the
/// inputs they depend on are not known yet.
fn set_computed(v: &mut Value) {
    let known = [
        "namespace",
        "create_namespace",
        "gateway_enabled",
        "gateway_service_port",
        "operator_audit_enabled",
    ]
    .iter()
    .all(|a| !v.get(a).is_unknown());
    match spec_from_value(v) {
        Ok(s) if known => {
            let objects = object_labels(&pm::manifests(&s));
            v.set("objects", objects);
            v.set("gateway_service", Value::opt_string(s.gateway_url()));
        }
        _ => {
            v.set("objects", Value::UNKNOWN);
            v.set("gateway_service", Value::UNKNOWN);
        }
    }
    v.set("id", v.get("namespace").clone());
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("namespace").as_str())
}

fn crd_refs() -> Vec<ObjRef> {
    pm::crds()
        .iter()
        .filter_map(|c| ObjRef::of(c).ok())
        .collect()
}

/// Applies the CRDs and waits until every one is Established, so the runtime (and any
/// EdgeDevice or AgentPolicy applied right after) finds its kinds served.
async fn install_crds(kube: &Kube, w: &str, force: bool) -> Result<(), Diagnostics> {
    kube.apply_all(w, &pm::crds(), force).await?;
    let deadline = Instant::now() + CRD_TIMEOUT;
    for r in crd_refs() {
        loop {
            let crd = kube.get(w, &r).await?.unwrap_or(Json::Null);
            if k::crd_established(&crd) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Diagnostics::single(
                    format!("CRD not established for {w}"),
                    format!(
                        "{r} was applied at {} but is not Established after {} s: {}",
                        kube.endpoint(),
                        CRD_TIMEOUT.as_secs(),
                        crd["status"]
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

async fn crds_established(kube: &Kube, w: &str) -> Result<bool, Diagnostics> {
    for r in crd_refs() {
        match kube.get(w, &r).await? {
            Some(c) if k::crd_established(&c) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Installs CRDs and applies every object; returns the state (planned + computed values).
async fn apply(
    data: &ProviderData,
    prior: Option<&Value>,
    planned: &Value,
) -> Result<Value, Diagnostics> {
    let w = what(planned);
    let spec = spec_from_value(planned)
        .map_err(|e| Diagnostics::single(format!("Invalid platform for {w}"), e))?;
    let force = k::force(planned);
    let kube = Kube::connect(&data.kube, &w).await?;
    install_crds(&kube, &w, force).await?;
    let manifests = pm::manifests(&spec);
    kube.apply_all(&w, &manifests, force).await?;

    // Objects the new configuration no longer has (e.g. the gateway switched off). The
    // namespace is never deleted here: that would delete everything in it.
    if let Some(prior) = prior
        && let Ok(old) = spec_from_value(prior)
    {
        let keep: BTreeSet<String> = manifests
            .iter()
            .filter_map(|m| ObjRef::of(m).ok())
            .map(|r| r.label())
            .collect();
        for m in pm::manifests(&old).iter().rev() {
            if let Ok(r) = ObjRef::of(m)
                && r.ar.kind != "Namespace"
                && !keep.contains(&r.label())
            {
                kube.delete(&w, &r).await?;
            }
        }
    }

    // No kubelet has to run the pods for the platform to be installed; the workloads must
    // exist, though, which the API confirms here.
    for m in manifests
        .iter()
        .filter(|m| m["kind"] == "Deployment" || m["kind"] == "StatefulSet")
    {
        let r = ObjRef::of(m).map_err(|e| Diagnostics::single("Internal error", e))?;
        if kube.get(&w, &r).await?.is_none() {
            return Err(Diagnostics::single(
                format!("{} missing after apply for {w}", r.ar.kind),
                format!(
                    "{r} was applied at {} but cannot be read back.",
                    kube.endpoint()
                ),
            ));
        }
    }
    let mut s = planned.clone();
    set_computed(&mut s);
    s.set("crds_established", Value::Bool(true));
    s.set("drift", Value::List(vec![]));
    tracing::info!(namespace = %spec.namespace, objects = manifests.len(), "platform applied");
    Ok(s)
}

// ---- read: live objects back onto the inputs ----

fn container(d: &Json) -> &Json {
    d.pointer("/spec/template/spec/containers/0")
        .unwrap_or(&Json::Null)
}

fn env_map(c: &Json) -> BTreeMap<String, String> {
    c["env"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_string(),
                        e["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn set_str(s: &mut Value, attr: &str, v: Option<&String>) {
    if let Some(v) = v {
        s.set(attr, Value::string(v.as_str()));
    }
}

fn set_num(s: &mut Value, attr: &str, v: Option<i64>) {
    if let Some(v) = v {
        s.set(attr, Value::int(v));
    }
}

fn parse_num(v: Option<&String>) -> Option<i64> {
    v.and_then(|s| s.parse().ok())
}

/// Maps the live worker Deployment onto the inputs it carries.
fn observe_worker(d: &Json, s: &mut Value) {
    let c = container(d);
    if let Some(i) = c["image"].as_str() {
        s.set("image", Value::string(i));
    }
    if let Some(p) = c["imagePullPolicy"].as_str() {
        s.set("image_pull_policy", Value::string(p));
    }
    let e = env_map(c);
    set_str(s, "queue_url", e.get("AGENTPLANE_QUEUE_URL"));
    set_str(s, "dlq_url", e.get("AGENTPLANE_DLQ_URL"));
    if let Some(f) = e.get("AGENTPLANE_QUEUE_FIFO") {
        s.set("queue_fifo", Value::Bool(f == "true"));
    }
    set_num(
        s,
        "visibility_timeout_seconds",
        parse_num(e.get("AGENTPLANE_VISIBILITY_TIMEOUT_SECS")),
    );
    set_num(
        s,
        "max_receive_count",
        parse_num(e.get("AGENTPLANE_MAX_RECEIVE_COUNT")),
    );
    set_num(
        s,
        "worker_concurrency",
        parse_num(e.get("AGENTPLANE_WORKERS")),
    );
    set_str(s, "log_level", e.get("RUST_LOG"));
    set_str(s, "log_format", e.get("AGENTPLANE_LOG_FORMAT"));
    s.set("region", Value::opt_string(e.get("AWS_REGION").cloned()));
    s.set(
        "aws_endpoint_url",
        Value::opt_string(e.get("AWS_ENDPOINT_URL").cloned()),
    );
    s.set(
        "kms_key_arn",
        Value::opt_string(
            e.get("AGENTPLANE_KMS_KEY_ID")
                .filter(|k| !k.is_empty())
                .cloned(),
        ),
    );
    // Only a replica count we own is ours to report: one KEDA or an HPA sets is not drift.
    let replicas = if k::owns_field(d, &["spec", "replicas"]) {
        d["spec"]["replicas"]
            .as_i64()
            .map_or(Value::Null, Value::int)
    } else {
        Value::Null
    };
    s.set("worker_replicas", replicas);
}

fn observe_operator(d: &Json, s: &mut Value) {
    set_num(s, "operator_replicas", d["spec"]["replicas"].as_i64());
    let e = env_map(container(d));
    set_num(
        s,
        "operator_concurrency",
        parse_num(e.get("AGENTPLANE_CONCURRENCY")),
    );
}

/// Gives every attribute that nothing live carried (an import, or the settings of a component
/// that is switched off: the gateway's, the audit log's) its default, or null, as the plan of a
/// configuration leaving it unset has it, so an import plans no change.
fn fill_defaults(s: &mut Value) {
    for a in schema_block().attributes {
        if s.get(a.name).is_null() {
            s.set(a.name, a.default.unwrap_or(Value::Null));
        }
    }
}

/// Whether the operator keeps an audit log, from which of its two kinds exists. With both or
/// neither (a kind switch that failed half way, or the workload deleted) the state keeps what
/// it had: the drift check then names what is missing, and the next apply finishes the switch.
fn operator_audited(deployment: bool, statefulset: bool, state: &Value) -> bool {
    match (deployment, statefulset) {
        (false, true) => true,
        (true, false) => false,
        _ => state.get("operator_audit_enabled").as_bool() == Some(true),
    }
}

/// Maps the live operator StatefulSet's audit settings onto their inputs. A size the API
/// server spells differently (`1024Mi` for `1Gi`) keeps the configured spelling.
fn observe_audit(sts: &Json, s: &mut Value, prior: &Value) {
    let e = env_map(container(sts));
    s.set(
        "operator_audit_kms_key_arn",
        Value::opt_string(
            e.get("AGENTPLANE_AUDIT_KMS_KEY_ID")
                .filter(|k| !k.is_empty())
                .cloned(),
        ),
    );
    let claim = sts
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Json::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["metadata"]["name"] == pm::AUDIT_VOLUME)
        })
        .map(|c| &c["spec"]);
    let Some(claim) = claim else { return };
    if let Some(size) = claim
        .pointer("/resources/requests/storage")
        .and_then(Json::as_str)
    {
        let configured = prior
            .get("operator_audit_storage_size")
            .as_str()
            .filter(|c| k::same_quantity(c, size));
        s.set(
            "operator_audit_storage_size",
            Value::string(configured.unwrap_or(size)),
        );
    }
    s.set(
        "operator_audit_storage_class",
        Value::opt_string(claim["storageClassName"].as_str()),
    );
}

fn observe_gateway(d: &Json, s: &mut Value) {
    set_num(s, "gateway_replicas", d["spec"]["replicas"].as_i64());
    let c = container(d);
    let e = env_map(c);
    set_num(
        s,
        "gateway_port",
        e.get("AGENTPLANE_LISTEN")
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok()),
    );
    let tls = d
        .pointer("/spec/template/spec/volumes")
        .and_then(Json::as_array)
        .and_then(|vs| vs.iter().find(|v| v["name"] == "tls"))
        .and_then(|v| v.pointer("/secret/secretName"))
        .and_then(Json::as_str);
    if let Some(t) = tls {
        s.set("gateway_tls_secret_name", Value::string(t));
    }
    s.set(
        "gateway_credentials_secret",
        Value::opt_string(
            c.pointer("/envFrom/0/secretRef/name")
                .and_then(Json::as_str),
        ),
    );
}

fn observe_tiers(cm: &Json, s: &mut Value, prior: &Value) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Tiers {
        #[serde(default)]
        tiers: Option<Vec<ModelTier>>,
    }
    let text = cm
        .pointer("/data/tiers.yaml")
        .and_then(Json::as_str)
        .unwrap_or("tiers: []");
    let parsed: Tiers = serde_yaml::from_str(text).map_err(|e| format!("tiers.yaml: {e}"))?;
    let tiers = parsed
        .tiers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let p = k::items(prior.get("model_tier"))
                .get(i)
                .cloned()
                .unwrap_or_default();
            tier_to_value(t, &p)
        })
        .collect();
    s.set("model_tier", Value::List(tiers));
    Ok(())
}

fn annotations(obj: &Json) -> BTreeMap<String, String> {
    obj.pointer("/metadata/annotations")
        .and_then(Json::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.starts_with("kubectl.kubernetes.io/"))
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// The secret names the worker Role grants `get` on.
fn worker_secret_names(role: &Json) -> Vec<String> {
    role["rules"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| r["resources"] == serde_json::json!(["secrets"]))
        })
        .and_then(|r| r["resourceNames"].as_array())
        .map(|ns| {
            ns.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn get_named(
    kube: &Kube,
    w: &str,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
) -> Result<Option<Json>, Diagnostics> {
    kube.get(w, &ObjRef::new(api_version, kind, Some(ns), name))
        .await
}

async fn read_platform(data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
    let w = what(state);
    let Some(ns) = state.get("namespace").as_str().map(str::to_string) else {
        return Ok(None);
    };
    let kube = Kube::connect(&data.kube, &w).await?;
    let namespace = kube
        .get(&w, &ObjRef::new("v1", "Namespace", None, &ns))
        .await?;
    let Some(namespace) = namespace.filter(|n| !k::terminating(n)) else {
        tracing::info!(%ns, "namespace gone or terminating; the platform no longer exists");
        return Ok(None);
    };
    let importing = state.get("queue_url").is_null();
    let dep = |c: &str| format!("{FULLNAME}-{c}");
    let operator_deployment =
        get_named(&kube, &w, "apps/v1", "Deployment", &ns, &dep("operator")).await?;
    let operator_statefulset =
        get_named(&kube, &w, "apps/v1", "StatefulSet", &ns, &dep("operator")).await?;
    let worker = get_named(&kube, &w, "apps/v1", "Deployment", &ns, &dep("worker")).await?;
    let gateway = get_named(&kube, &w, "apps/v1", "Deployment", &ns, &dep("gateway")).await?;
    if importing && worker.is_none() {
        // Nothing of ours in this namespace: there is nothing to import.
        return Ok(None);
    }
    let mut s = match state {
        Value::Object(_) => state.clone(),
        _ => Value::Object(BTreeMap::new()),
    };
    if let Some(d) = &worker {
        observe_worker(d, &mut s);
    }
    let audited = operator_audited(
        operator_deployment.is_some(),
        operator_statefulset.is_some(),
        state,
    );
    s.set("operator_audit_enabled", Value::Bool(audited));
    let operator = if audited {
        &operator_statefulset
    } else {
        &operator_deployment
    };
    if let Some(d) = operator {
        observe_operator(d, &mut s);
        if audited {
            observe_audit(d, &mut s, state);
        }
    }
    match &gateway {
        Some(d) => {
            s.set("gateway_enabled", Value::Bool(true));
            observe_gateway(d, &mut s);
        }
        None if importing => s.set("gateway_enabled", Value::Bool(false)),
        // A configured gateway that was deleted shows as drift below.
        None => {}
    }
    if let Some(svc) = get_named(&kube, &w, "v1", "Service", &ns, &dep("gateway")).await? {
        if let Some(t) = svc.pointer("/spec/type").and_then(Json::as_str) {
            s.set("gateway_service_type", Value::string(t));
        }
        set_num(
            &mut s,
            "gateway_service_port",
            svc.pointer("/spec/ports/0/port").and_then(Json::as_i64),
        );
    }
    if let Some(cm) = get_named(&kube, &w, "v1", "ConfigMap", &ns, pm::MODELS_CONFIGMAP).await? {
        observe_tiers(&cm, &mut s, state).map_err(|e| {
            Diagnostics::single(
                format!("Unreadable model tiers for {w}"),
                format!("ConfigMap {ns}/{}: {e}", pm::MODELS_CONFIGMAP),
            )
        })?;
    } else if importing {
        s.set("model_tier", Value::List(vec![]));
    }
    let rbac = "rbac.authorization.k8s.io/v1";
    if let Some(role) = get_named(&kube, &w, rbac, "Role", &ns, &dep("worker")).await? {
        s.set(
            "worker_secret_names",
            k::string_list(
                &worker_secret_names(&role),
                state.get("worker_secret_names"),
            ),
        );
    }
    for c in pm::COMPONENTS {
        if let Some(sa) = get_named(&kube, &w, "v1", "ServiceAccount", &ns, &dep(c)).await? {
            let attr = format!("{c}_service_account_annotations");
            let prior = state.get(&attr).clone();
            s.set(&attr, tags_value(annotations(&sa), &prior));
        }
    }
    if s.get("create_namespace").is_null() {
        s.set(
            "create_namespace",
            Value::Bool(k::managed_by_us(&namespace)),
        );
    }
    fill_defaults(&mut s);
    s.set(
        "crds_established",
        Value::Bool(crds_established(&kube, &w).await?),
    );

    // Everything the inputs cannot show: ask the API server what re-applying would change.
    let spec = spec_from_value(&s)
        .map_err(|e| Diagnostics::single(format!("Invalid platform state for {w}"), e))?;
    let mut drift = Vec::new();
    for m in pm::manifests(&spec) {
        if let Some(d) = kube.drift(&w, &m, k::force(&s)).await? {
            drift.push(Value::string(d));
        }
    }
    if !drift.is_empty() {
        tracing::info!(%ns, drifted = drift.len(), "platform objects differ from the configuration");
    }
    s.set("drift", Value::List(drift));
    set_computed(&mut s);
    Ok(Some(s))
}

/// The operator's audit settings: a storage size the chart's schema would accept, a
/// StorageClass name, a KMS key reference.
fn validate_audit(config: &Value, diags: &mut Diagnostics) {
    if let Some(size) = config.get("operator_audit_storage_size").as_str()
        && !is_storage_size(size)
    {
        diags.attr_error(
            AttrPath::attr("operator_audit_storage_size"),
            "Invalid storage size",
            format!(
                "{size:?} is not a Kubernetes quantity of bytes, e.g. `1Gi`, `500Mi` or `10G`."
            ),
        );
    }
    if let Some(class) = config.get("operator_audit_storage_class").as_str()
        && !k::is_dns_subdomain(class)
    {
        diags.attr_error(
            AttrPath::attr("operator_audit_storage_class"),
            "Invalid StorageClass name",
            format!("{class:?} is not a valid StorageClass name (lowercase letters, digits, '-' and '.')."),
        );
    }
    if let Some(key) = config.get("operator_audit_kms_key_arn").as_str()
        && (key.is_empty() || key.len() > 2048 || key.contains(char::is_whitespace))
    {
        diags.attr_error(
            AttrPath::attr("operator_audit_kms_key_arn"),
            "Invalid KMS key",
            format!("{key:?} is not a KMS key ARN, alias or key id."),
        );
    }
}

/// Whether the last refresh found the operator StatefulSet deleted: its claim templates are
/// then free to change (the next apply creates it anew).
fn operator_statefulset_gone(prior: &Value) -> bool {
    let Some(ns) = prior.get("namespace").as_str() else {
        return false;
    };
    let gone = format!("StatefulSet {ns}/{FULLNAME}-operator: deleted outside Terraform");
    k::strings(prior.get("drift")).contains(&gone)
}

/// Refuses, at plan, to change the audit volumes of an operator StatefulSet that exists.
/// Kubernetes refuses any change to a StatefulSet's volume claim templates, and replacing the
/// StatefulSet would not help: the claims `audit-agentplane-operator-<n>` outlive it (they hold
/// the audit logs) and the new one would reuse them as they are, so the state would claim a
/// size or class the logs' volumes do not have. Unknown values are checked when they are known
/// (Terraform plans again at apply).
fn check_audit_storage(prior: &Value, planned: &Value, diags: &mut Diagnostics) {
    let audited = |v: &Value| v.get("operator_audit_enabled").as_bool() == Some(true);
    if prior.is_null() || !audited(prior) || !audited(planned) || operator_statefulset_gone(prior) {
        return;
    }
    let ns = prior.get("namespace").as_str().unwrap_or("<namespace>");
    for attr in AUDIT_STORAGE_ATTRS {
        let (old, new) = (prior.get(attr), planned.get(attr));
        if new.is_unknown() {
            continue;
        }
        let unchanged = match (k::opt_str(old), k::opt_str(new)) {
            (Some(a), Some(b)) => a == b || k::same_quantity(&a, &b),
            (a, b) => a == b,
        };
        if unchanged {
            continue;
        }
        let show = |v: &Value| v.as_str().map_or("unset".to_string(), |s| format!("{s:?}"));
        diags.attr_error(
            AttrPath::attr(attr),
            "Audit storage cannot change in place",
            format!(
                "{attr} {} -> {}: the operator StatefulSet {ns}/{FULLNAME}-operator exists, and Kubernetes refuses any change to its volume claim templates. Replacing it would not resize or move the volumes either: the claims {}-{FULLNAME}-operator-<n> hold the replicas' audit logs, outlive the StatefulSet and would be reused as they are.\n\
                 Keep {}, or:\n\
                 - to grow the volumes without a gap in the logs: expand each claim (its StorageClass must allow expansion), run `kubectl -n {ns} delete statefulset {FULLNAME}-operator --cascade=orphan` (the pods keep running), refresh and apply the new size: the StatefulSet is created again and adopts the pods;\n\
                 - to start over on new volumes: copy and verify the logs (`agentplane audit verify`), set operator_audit_enabled = false and apply, delete the claims, then enable the log with the new storage.",
                show(old),
                show(new),
                pm::AUDIT_VOLUME,
                show(old),
            ),
        );
    }
}

#[async_trait]
impl Resource<ProviderData> for Platform {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: schema_block(),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        if let Some(ns) = config.get("namespace").as_str()
            && !k::is_dns_label(ns)
        {
            diags.attr_error(
                AttrPath::attr("namespace"),
                "Invalid namespace",
                format!("{ns:?} is not a valid namespace name (lowercase letters, digits, '-', at most 63)."),
            );
        }
        for attr in ["queue_url", "dlq_url", "aws_endpoint_url"] {
            if let Some(u) = config.get(attr).as_str()
                && !(u.starts_with("https://") || u.starts_with("http://"))
            {
                diags.attr_error(
                    AttrPath::attr(attr),
                    "Invalid URL",
                    format!("{attr} must be an http(s) URL, got {u:?}."),
                );
            }
        }
        if let Some(i) = config.get("image").as_str()
            && (i.is_empty() || i.contains(char::is_whitespace))
        {
            diags.attr_error(
                AttrPath::attr("image"),
                "Invalid image",
                format!(
                    "{i:?} is not an image reference (`repository:tag` or `repository@sha256:...`)."
                ),
            );
        }
        for (i, n) in k::strings(config.get("worker_secret_names"))
            .iter()
            .enumerate()
        {
            if !k::is_dns_subdomain(n) {
                diags.attr_error(
                    AttrPath::attr("worker_secret_names").index(i as i64),
                    "Invalid Secret name",
                    format!("{n:?} is not a valid Secret name."),
                );
            }
        }
        validate_tiers(
            k::items(config.get("model_tier")),
            &AttrPath::attr("model_tier"),
            diags,
        );
        validate_audit(config, diags);
    }

    fn modify_plan(
        &self,
        prior: &Value,
        planned: &mut Value,
        _config: &Value,
        diags: &mut Diagnostics,
    ) {
        check_audit_storage(prior, planned, diags);
        set_computed(planned);
        planned.set("crds_established", Value::Bool(true));
        // Whatever drift was read, applying this plan removes it.
        planned.set("drift", Value::List(vec![]));
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        apply(data, None, planned).await
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        read_platform(data, state).await
    }

    async fn update(
        &self,
        data: &ProviderData,
        prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        apply(data, Some(prior), planned).await
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let w = what(state);
        let spec = spec_from_value(state)
            .map_err(|e| Diagnostics::single(format!("Invalid platform state for {w}"), e))?;
        let kube = Kube::connect(&data.kube, &w).await?;
        // Each object explicitly, newest first, then the namespace if it is ours: the runtime
        // is gone even where namespace deletion is slow (or, without a controller, never ends).
        for m in pm::manifests(&spec).iter().rev() {
            let r = ObjRef::of(m).map_err(|e| Diagnostics::single("Internal error", e))?;
            kube.delete(&w, &r).await?;
        }
        if state.get("delete_crds").as_bool() == Some(true) {
            for r in crd_refs() {
                kube.delete(&w, &r).await?;
            }
        }
        Ok(())
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        if !k::is_dns_label(id) {
            return Err(Diagnostics::single(
                "Invalid import ID",
                format!("{TYPE} is imported by its namespace, got {id:?}."),
            ));
        }
        Ok(Value::Object(BTreeMap::from([(
            "namespace".into(),
            Value::string(id),
        )])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::plan;

    fn config() -> Value {
        let block = schema_block();
        let Type::Object(attrs) = block.ty() else {
            panic!()
        };
        let mut m: BTreeMap<String, Value> =
            attrs.keys().map(|k| (k.clone(), Value::Null)).collect();
        m.insert("namespace".into(), Value::string("ap"));
        m.insert(
            "queue_url".into(),
            Value::string("http://127.0.0.1:5000/1/q"),
        );
        m.insert(
            "dlq_url".into(),
            Value::string("http://127.0.0.1:5000/1/q-dlq"),
        );
        m.insert("model_tier".into(), Value::List(vec![]));
        Value::Object(m)
    }

    #[test]
    fn plan_knows_objects_and_gateway_url() {
        let cfg = config();
        let mut p = plan::plan(&schema_block(), &Value::Null, &cfg, &cfg).state;
        Platform.modify_plan(&Value::Null, &mut p, &cfg, &mut Diagnostics::new());
        assert_eq!(
            p.get("gateway_service"),
            &Value::string("https://agentplane-gateway.ap.svc:443")
        );
        let objects = k::strings(p.get("objects"));
        assert!(
            objects.contains(&"Deployment ap/agentplane-worker".to_string()),
            "{objects:?}"
        );
        assert!(objects.contains(&"Namespace ap".to_string()));
        assert_eq!(p.get("drift"), &Value::List(vec![]));
        assert_eq!(p.get("id"), &Value::string("ap"));
    }

    #[test]
    fn unknown_namespace_leaves_objects_unknown() {
        let mut cfg = config();
        cfg.set("namespace", Value::UNKNOWN);
        let mut p = plan::plan(&schema_block(), &Value::Null, &cfg, &cfg).state;
        Platform.modify_plan(&Value::Null, &mut p, &cfg, &mut Diagnostics::new());
        assert!(p.get("objects").is_unknown());
    }

    #[test]
    fn worker_deployment_maps_back_onto_inputs() {
        let cfg = config();
        let mut p = plan::plan(&schema_block(), &Value::Null, &cfg, &cfg).state;
        p.set("region", Value::string("eu-west-1"));
        p.set("kms_key_arn", Value::string("arn:k"));
        p.set("worker_concurrency", Value::int(9));
        let spec = spec_from_value(&p).unwrap();
        let worker = pm::manifests(&spec)
            .into_iter()
            .find(|m| m["kind"] == "Deployment" && m["metadata"]["name"] == "agentplane-worker")
            .unwrap();
        let mut s = config();
        observe_worker(&worker, &mut s);
        for a in [
            "queue_url",
            "region",
            "kms_key_arn",
            "worker_concurrency",
            "image",
        ] {
            assert_eq!(s.get(a), p.get(a), "{a}");
        }
    }

    /// A planned value for `config` with the audit log on, as Terraform would plan it.
    fn audited(size: &str, class: Option<&str>) -> Value {
        let mut cfg = config();
        cfg.set("operator_audit_enabled", Value::Bool(true));
        cfg.set("operator_audit_storage_size", Value::string(size));
        cfg.set("operator_audit_storage_class", Value::opt_string(class));
        let mut p = plan::plan(&schema_block(), &Value::Null, &cfg, &cfg).state;
        Platform.modify_plan(&Value::Null, &mut p, &cfg, &mut Diagnostics::new());
        p
    }

    fn plan_errors(prior: &Value, planned: &Value) -> String {
        let mut d = Diagnostics::new();
        let mut p = planned.clone();
        Platform.modify_plan(prior, &mut p, planned, &mut d);
        d.to_string()
    }

    #[test]
    fn audit_storage_of_an_existing_statefulset_cannot_change() {
        let prior = audited("1Gi", None);
        assert!(
            k::strings(prior.get("objects"))
                .contains(&"StatefulSet ap/agentplane-operator".to_string())
        );
        // The same amount spelled another way is no change.
        assert_eq!(plan_errors(&prior, &audited("1024Mi", None)), "");
        let err = plan_errors(&prior, &audited("2Gi", None));
        assert!(err.contains("operator_audit_storage_size"), "{err}");
        assert!(err.contains("\"1Gi\" -> \"2Gi\""), "{err}");
        assert!(err.contains("--cascade=orphan"), "{err}");
        let err = plan_errors(&prior, &audited("1Gi", Some("gp3")));
        assert!(err.contains("operator_audit_storage_class"), "{err}");
        assert!(err.contains("unset -> \"gp3\""), "{err}");

        // Free to change while no StatefulSet holds them: the log was off...
        let mut off = prior.clone();
        off.set("operator_audit_enabled", Value::Bool(false));
        assert_eq!(plan_errors(&off, &audited("2Gi", Some("gp3"))), "");
        // ...or the refresh found the StatefulSet deleted.
        let mut gone = prior.clone();
        gone.set(
            "drift",
            Value::List(vec![Value::string(
                "StatefulSet ap/agentplane-operator: deleted outside Terraform",
            )]),
        );
        assert_eq!(plan_errors(&gone, &audited("2Gi", None)), "");
        // Turning the log off is always allowed.
        let mut disable = audited("2Gi", None);
        disable.set("operator_audit_enabled", Value::Bool(false));
        assert_eq!(plan_errors(&prior, &disable), "");
    }

    #[test]
    fn audit_settings_are_validated() {
        let mut cfg = config();
        cfg.set("operator_audit_storage_size", Value::string("lots"));
        cfg.set("operator_audit_storage_class", Value::string("Fast_SSD"));
        cfg.set("operator_audit_kms_key_arn", Value::string("not a key"));
        let mut d = Diagnostics::new();
        Platform.validate(&cfg, &mut d);
        let text = d.to_string();
        for attr in [
            "operator_audit_storage_size",
            "operator_audit_storage_class",
            "operator_audit_kms_key_arn",
        ] {
            assert!(text.contains(attr), "{attr}: {text}");
        }
        for ok in ["1Gi", "500Mi", "10G", "1.5Gi"] {
            assert!(is_storage_size(ok), "{ok}");
        }
        for bad in ["", "1500m", "-1Gi", "1 Gi"] {
            assert!(!is_storage_size(bad), "{bad}");
        }
    }

    #[test]
    fn operator_statefulset_maps_back_onto_the_audit_inputs() {
        let p = audited("1Gi", Some("gp3"));
        let mut p2 = p.clone();
        p2.set(
            "operator_audit_kms_key_arn",
            Value::string("arn:aws:kms:us-east-1:1:key/a"),
        );
        let spec = spec_from_value(&p2).unwrap();
        let mut sts = pm::manifests(&spec)
            .into_iter()
            .find(|m| m["kind"] == "StatefulSet")
            .unwrap();
        // The API server writes quantities back in its own spelling.
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
            serde_json::json!("1024Mi");
        let mut s = config();
        observe_audit(&sts, &mut s, &p2);
        for a in [
            "operator_audit_kms_key_arn",
            "operator_audit_storage_size",
            "operator_audit_storage_class",
        ] {
            assert_eq!(s.get(a), p2.get(a), "{a}");
        }
        // Read from a state that had another size, the live one shows.
        let mut other = p2.clone();
        other.set("operator_audit_storage_size", Value::string("5Gi"));
        observe_audit(&sts, &mut s, &other);
        assert_eq!(
            s.get("operator_audit_storage_size"),
            &Value::string("1024Mi")
        );

        assert!(operator_audited(false, true, &Value::Null));
        assert!(!operator_audited(true, false, &p));
        assert!(operator_audited(true, true, &p), "both: the state decides");
    }

    #[test]
    fn import_takes_a_namespace() {
        assert!(Platform.import_state("agentplane").is_ok());
        assert!(Platform.import_state("a/b").is_err());
    }
}
