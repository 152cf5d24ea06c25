//! `agentplane_keda_scaler`: scales the worker Deployment on SQS queue depth with KEDA — a
//! `ScaledObject` (keda.sh/v1alpha1, trigger `aws-sqs-queue`) and the `TriggerAuthentication`
//! it uses (`podIdentity.provider: aws`: IRSA / EKS Pod Identity of the workers or of KEDA).
//!
//! The objects are the ones the chart renders with `worker.keda.enabled` (same names, same
//! trigger metadata), so the operator's runtime contract is the same either way. KEDA itself
//! (its CRDs and controller) must already be installed in the cluster.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::{Value as Json, json};

use super::label;
use crate::config::ProviderData;
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Validator, Value,
};
use crate::kube::{self as k, Kube, ObjRef};

pub const TYPE: &str = "agentplane_keda_scaler";
pub const API_VERSION: &str = "keda.sh/v1alpha1";
pub const TRIGGER: &str = "aws-sqs-queue";
/// KEDA's `podIdentity.identityOwner` values (KEDA 2.13+).
pub const IDENTITY_OWNERS: &[&str] = &["workload", "keda"];

pub struct KedaScaler;

fn schema_block() -> Block {
    Block::new("A KEDA ScaledObject that scales the agentplane workers on SQS queue depth (trigger `aws-sqs-queue`), and its TriggerAuthentication (`podIdentity.provider: aws`). Needs KEDA 2.13 or newer in the cluster. Leave `worker_replicas` of `agentplane_platform` unset when using it.")
        .attr(Attribute::string("id").computed().describe("`<namespace>/<name>`."))
        .attr(Attribute::string("namespace").required().force_new().validate(Validator::LenRange(1, 63)).describe("Namespace of the runtime. Changing it replaces both objects."))
        .attr(Attribute::string("name").default(Value::string("agentplane-worker")).force_new().validate(Validator::LenRange(1, 253)).describe("ScaledObject name. Changing it replaces both objects."))
        .attr(Attribute::string("trigger_authentication_name").default(Value::string("agentplane-sqs")).force_new().validate(Validator::LenRange(1, 253)).describe("TriggerAuthentication name. Changing it replaces both objects."))
        .attr(Attribute::string("target_deployment").default(Value::string("agentplane-worker")).describe("Deployment to scale (the platform's worker Deployment)."))
        .attr(Attribute::string("queue_url").required().describe("URL of the SQS task queue (`queueURL`)."))
        .attr(Attribute::string("aws_region").optional().describe("Region of the queue (`awsRegion`); unset lets KEDA derive it from the URL."))
        .attr(Attribute::string("aws_endpoint").optional().describe("SQS endpoint override (`awsEndpoint`), for emulators only."))
        .attr(Attribute::number("queue_length").default(Value::int(5)).validate(Validator::IntRange(1, 100_000)).describe("Target messages per worker replica (`queueLength`)."))
        .attr(Attribute::number("activation_queue_length").default(Value::int(0)).validate(Validator::IntRange(0, 100_000)).describe("Queue length above which KEDA scales from zero (`activationQueueLength`)."))
        .attr(Attribute::bool("scale_on_in_flight").default(Value::Bool(true)).describe("Count in-flight messages toward the queue length (`scaleOnInFlight`)."))
        .attr(Attribute::number("min_replicas").default(Value::int(0)).validate(Validator::IntRange(0, 1000)).describe("`minReplicaCount`; 0 scales the workers to zero when the queue is empty."))
        .attr(Attribute::number("max_replicas").default(Value::int(10)).validate(Validator::IntRange(1, 1000)).describe("`maxReplicaCount`."))
        .attr(Attribute::number("polling_interval").default(Value::int(30)).validate(Validator::IntRange(1, 3600)).describe("Seconds between queue depth checks (`pollingInterval`)."))
        .attr(Attribute::number("cooldown_period").default(Value::int(300)).validate(Validator::IntRange(0, 86_400)).describe("Seconds after the last activity before scaling to zero (`cooldownPeriod`)."))
        .attr(Attribute::string("identity_owner").default(Value::string("workload")).validate(Validator::OneOf(IDENTITY_OWNERS)).describe("Whose AWS identity reads the queue depth: `workload` (the worker ServiceAccount's role) or `keda` (the KEDA operator's). Ignored when `role_arn` is set."))
        .attr(Attribute::string("role_arn").optional().describe("IAM role KEDA assumes to read the queue depth, instead of `identity_owner`."))
        .attr(Attribute::bool("force").default(Value::Bool(false)).describe("Take over fields another field manager owns instead of failing with a conflict."))
}

fn int(v: &Value, name: &str) -> i64 {
    v.get(name).as_i64().unwrap_or(0)
}

fn labels() -> Json {
    json!({
        "app.kubernetes.io/managed-by": k::FIELD_MANAGER,
        "app.kubernetes.io/part-of": "agentplane",
        "app.kubernetes.io/component": "worker",
    })
}

/// The TriggerAuthentication and the ScaledObject, in apply order.
pub fn manifests(v: &Value) -> Vec<Json> {
    let ns = v.get("namespace").as_str();
    let ta_name = v.get("trigger_authentication_name").as_str();
    let mut pod_identity = json!({ "provider": "aws" });
    match k::opt_str(v.get("role_arn")) {
        Some(arn) => pod_identity["roleArn"] = Json::String(arn),
        None => {
            pod_identity["identityOwner"] = Json::String(
                v.get("identity_owner")
                    .as_str()
                    .unwrap_or("workload")
                    .into(),
            )
        }
    }
    let ta = json!({
        "apiVersion": API_VERSION,
        "kind": "TriggerAuthentication",
        "metadata": { "name": ta_name, "namespace": ns, "labels": labels() },
        "spec": { "podIdentity": pod_identity },
    });
    // KEDA trigger metadata is a map of strings.
    let mut meta = json!({
        "queueURL": v.get("queue_url").as_str(),
        "queueLength": int(v, "queue_length").to_string(),
        "activationQueueLength": int(v, "activation_queue_length").to_string(),
        "scaleOnInFlight": v.get("scale_on_in_flight").as_bool().unwrap_or(true).to_string(),
    });
    if let Some(r) = k::opt_str(v.get("aws_region")) {
        meta["awsRegion"] = Json::String(r);
    }
    if let Some(e) = k::opt_str(v.get("aws_endpoint")) {
        meta["awsEndpoint"] = Json::String(e);
    }
    let so = json!({
        "apiVersion": API_VERSION,
        "kind": "ScaledObject",
        "metadata": { "name": v.get("name").as_str(), "namespace": ns, "labels": labels() },
        "spec": {
            "scaleTargetRef": { "name": v.get("target_deployment").as_str() },
            "minReplicaCount": int(v, "min_replicas"),
            "maxReplicaCount": int(v, "max_replicas"),
            "pollingInterval": int(v, "polling_interval"),
            "cooldownPeriod": int(v, "cooldown_period"),
            "triggers": [{
                "type": TRIGGER,
                "authenticationRef": { "name": ta_name },
                "metadata": meta,
            }],
        },
    });
    vec![ta, so]
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("name").as_str())
}

fn refs(v: &Value) -> (ObjRef, ObjRef) {
    let ns = v.get("namespace").as_str();
    (
        ObjRef::new(
            API_VERSION,
            "TriggerAuthentication",
            ns,
            v.get("trigger_authentication_name")
                .as_str()
                .unwrap_or("agentplane-sqs"),
        ),
        ObjRef::new(
            API_VERSION,
            "ScaledObject",
            ns,
            v.get("name").as_str().unwrap_or("agentplane-worker"),
        ),
    )
}

fn id(v: &Value) -> Value {
    match (v.get("namespace").as_str(), v.get("name").as_str()) {
        (Some(ns), Some(n)) => Value::string(format!("{ns}/{n}")),
        _ => Value::UNKNOWN,
    }
}

fn json_int(j: &Json) -> Option<i64> {
    j.as_i64()
        .or_else(|| j.as_str().and_then(|s| s.parse().ok()))
}

/// Reads the two live objects back into a state object.
fn observe(so: &Json, ta: &Json, s: &mut Value) {
    let spec = &so["spec"];
    s.set(
        "target_deployment",
        Value::opt_string(spec.pointer("/scaleTargetRef/name").and_then(Json::as_str)),
    );
    // KEDA's defaults when a count is left out (someone removed it out of band).
    for (attr, field, default) in [
        ("min_replicas", "minReplicaCount", 0),
        ("max_replicas", "maxReplicaCount", 100),
        ("polling_interval", "pollingInterval", 30),
        ("cooldown_period", "cooldownPeriod", 300),
    ] {
        s.set(attr, Value::int(json_int(&spec[field]).unwrap_or(default)));
    }
    let trigger = spec["triggers"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["type"] == TRIGGER))
        .cloned()
        .unwrap_or(Json::Null);
    let meta = &trigger["metadata"];
    let text = |k: &str| Value::opt_string(meta[k].as_str());
    s.set("queue_url", text("queueURL"));
    s.set("aws_region", text("awsRegion"));
    s.set("aws_endpoint", text("awsEndpoint"));
    s.set(
        "queue_length",
        json_int(&meta["queueLength"]).map_or(Value::Null, Value::int),
    );
    s.set(
        "activation_queue_length",
        Value::int(json_int(&meta["activationQueueLength"]).unwrap_or(0)),
    );
    s.set(
        "scale_on_in_flight",
        Value::Bool(meta["scaleOnInFlight"].as_str() != Some("false")),
    );
    let pi = &ta["spec"]["podIdentity"];
    s.set("role_arn", Value::opt_string(pi["roleArn"].as_str()));
    match pi["identityOwner"].as_str() {
        Some(o) => s.set("identity_owner", Value::string(o)),
        // With a role ARN the owner is not sent; keep what the configuration said.
        None if s.get("identity_owner").is_null() => {
            s.set("identity_owner", Value::string("workload"))
        }
        None => {}
    }
}

async fn apply(data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
    let w = what(planned);
    let kube = Kube::connect(&data.kube, &w).await?;
    kube.apply_all(&w, &manifests(planned), k::force(planned))
        .await?;
    let mut s = planned.clone();
    s.set("id", id(planned));
    Ok(s)
}

#[async_trait]
impl Resource<ProviderData> for KedaScaler {
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
                format!("{ns:?} is not a valid namespace name (lowercase letters, digits, '-')."),
            );
        }
        for n in ["name", "trigger_authentication_name", "target_deployment"] {
            if let Some(v) = config.get(n).as_str()
                && !k::is_dns_subdomain(v)
            {
                diags.attr_error(
                    AttrPath::attr(n),
                    "Invalid name",
                    format!("{v:?} is not a valid object name (lowercase RFC 1123 subdomain)."),
                );
            }
        }
        if let (Some(min), Some(max)) = (
            config.get("min_replicas").as_i64(),
            config.get("max_replicas").as_i64(),
        ) && min > max
        {
            diags.attr_error(
                AttrPath::attr("min_replicas"),
                "Invalid replica range",
                format!("min_replicas ({min}) must not exceed max_replicas ({max})."),
            );
        }
        if let Some(u) = config.get("queue_url").as_str()
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            diags.attr_error(
                AttrPath::attr("queue_url"),
                "Invalid queue URL",
                format!("{u:?} must be the queue's http(s) URL."),
            );
        }
        if !config.get("role_arn").is_null() && !config.get("identity_owner").is_null() {
            diags.attr_error(
                AttrPath::attr("identity_owner"),
                "Conflicting identity settings",
                "Set either `identity_owner` or `role_arn` (KEDA treats them as mutually exclusive).",
            );
        }
    }

    fn modify_plan(
        &self,
        _prior: &Value,
        planned: &mut Value,
        _config: &Value,
        _diags: &mut Diagnostics,
    ) {
        let i = id(planned);
        planned.set("id", i);
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        apply(data, planned).await
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let w = what(state);
        let kube = Kube::connect(&data.kube, &w).await?;
        let (ta_ref, so_ref) = refs(state);
        let Some(so) = kube.get(&w, &so_ref).await? else {
            return Ok(None);
        };
        // The TriggerAuthentication is part of this resource: without it, recreate both.
        let Some(ta) = kube.get(&w, &ta_ref).await? else {
            return Ok(None);
        };
        let mut s = match state {
            Value::Object(_) => state.clone(),
            _ => Value::Object(BTreeMap::new()),
        };
        s.set("name", Value::string(so_ref.name.as_str()));
        s.set(
            "trigger_authentication_name",
            Value::string(ta_ref.name.as_str()),
        );
        observe(&so, &ta, &mut s);
        s.set("id", id(&s));
        if s.get("force").is_null() {
            s.set("force", Value::Bool(false));
        }
        Ok(Some(s))
    }

    async fn update(
        &self,
        data: &ProviderData,
        _prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        apply(data, planned).await
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let w = what(state);
        let kube = Kube::connect(&data.kube, &w).await?;
        let (ta, so) = refs(state);
        // The ScaledObject first: it is what references the authentication.
        kube.delete(&w, &so).await?;
        kube.delete(&w, &ta).await
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        let (ns, name) = k::split_import_id(TYPE, id)?;
        Ok(Value::Object(BTreeMap::from([
            ("namespace".into(), Value::string(ns)),
            ("name".into(), Value::string(name)),
        ])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned() -> Value {
        Value::Object(
            [
                ("namespace", Value::string("team-a")),
                ("name", Value::string("agentplane-worker")),
                (
                    "trigger_authentication_name",
                    Value::string("agentplane-sqs"),
                ),
                ("target_deployment", Value::string("agentplane-worker")),
                (
                    "queue_url",
                    Value::string("https://sqs.eu-west-1.amazonaws.com/1/q"),
                ),
                ("aws_region", Value::string("eu-west-1")),
                ("aws_endpoint", Value::Null),
                ("queue_length", Value::int(5)),
                ("activation_queue_length", Value::int(0)),
                ("scale_on_in_flight", Value::Bool(true)),
                ("min_replicas", Value::int(0)),
                ("max_replicas", Value::int(10)),
                ("polling_interval", Value::int(30)),
                ("cooldown_period", Value::int(300)),
                ("identity_owner", Value::string("workload")),
                ("role_arn", Value::Null),
                ("force", Value::Bool(false)),
                ("id", Value::string("team-a/agentplane-worker")),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        )
    }

    #[test]
    fn manifests_match_the_chart_and_read_back() {
        let v = planned();
        let m = manifests(&v);
        assert_eq!(m[0]["spec"]["podIdentity"]["identityOwner"], "workload");
        let t = &m[1]["spec"]["triggers"][0];
        assert_eq!(t["type"], "aws-sqs-queue");
        assert_eq!(t["metadata"]["queueLength"], "5");
        assert_eq!(t["metadata"]["scaleOnInFlight"], "true");
        assert_eq!(t["authenticationRef"]["name"], "agentplane-sqs");
        let mut back = v.clone();
        observe(&m[1], &m[0], &mut back);
        assert_eq!(back, v);
    }

    #[test]
    fn min_above_max_is_an_error() {
        let mut v = planned();
        v.set("min_replicas", Value::int(20));
        v.set("identity_owner", Value::Null);
        let mut d = Diagnostics::new();
        KedaScaler.validate(&v, &mut d);
        assert_eq!(d.0[0].path.as_ref().unwrap().to_string(), "min_replicas");
    }
}
