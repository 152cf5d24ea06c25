//! The runtime `agentplane_platform` installs: the same objects, names, environment, RBAC and
//! security settings as `charts/agentplane` renders for release `agentplane` (its README's
//! "runtime contract"), built in Rust so the provider needs no Helm.
//!
//! A change to the chart's contract must be made here too; `tests/kube_resources.rs` renders
//! the chart with Helm and compares the two object by object.

use std::collections::BTreeMap;

use agentplane_api::policy::ModelTier;
use serde_json::{Value as Json, json};

use crate::kube::FIELD_MANAGER;

/// Base name of every object (the chart's `fullname`): the KEDA ScaledObject and the Crossplane
/// compositions target `agentplane-worker` by this name.
pub const FULLNAME: &str = "agentplane";
pub const MODELS_CONFIGMAP: &str = "agentplane-models";
pub const JOIN_TOKENS_SECRET: &str = "agentplane-join-tokens";
pub const TIERS_FILE: &str = "/etc/agentplane/models/tiers.yaml";
pub const METRICS_PORT: i64 = 9090;
pub const COMPONENTS: [&str; 3] = ["operator", "worker", "gateway"];
/// Where each operator replica's audit volume is mounted.
pub const AUDIT_DIR: &str = "/var/lib/agentplane/audit";
/// Name of the operator StatefulSet's volume claim template: the claims are
/// `audit-agentplane-operator-<n>`.
pub const AUDIT_VOLUME: &str = "audit";

/// The operator's audit log (the chart's `operator.audit`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSpec {
    /// KMS key signing the checkpoints; `None` means a local Ed25519 key on each volume.
    pub kms_key_arn: Option<String>,
    /// Size of each replica's volume, a Kubernetes quantity.
    pub storage_size: String,
    /// StorageClass of the volumes; `None` means the cluster's default.
    pub storage_class: Option<String>,
}

/// Everything the platform's objects are rendered from.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformSpec {
    pub namespace: String,
    pub create_namespace: bool,
    pub image: String,
    pub image_pull_policy: String,
    pub queue_url: String,
    pub dlq_url: String,
    pub queue_fifo: bool,
    pub visibility_timeout_seconds: i64,
    pub max_receive_count: i64,
    pub region: Option<String>,
    pub aws_endpoint_url: Option<String>,
    pub kms_key_arn: Option<String>,
    pub model_tiers: Vec<ModelTier>,
    pub log_level: String,
    pub log_format: String,
    pub operator_replicas: i64,
    pub operator_concurrency: i64,
    /// `Some` runs the operator as a StatefulSet keeping an audit log per replica.
    pub operator_audit: Option<AuditSpec>,
    /// `None` leaves `spec.replicas` out (KEDA or another autoscaler owns it).
    pub worker_replicas: Option<i64>,
    pub worker_concurrency: i64,
    pub worker_secret_names: Vec<String>,
    pub gateway_enabled: bool,
    pub gateway_replicas: i64,
    pub gateway_port: i64,
    pub gateway_service_type: String,
    pub gateway_service_port: i64,
    pub gateway_tls_secret_name: String,
    pub gateway_credentials_secret: Option<String>,
    /// ServiceAccount annotations per component (e.g. `eks.amazonaws.com/role-arn`).
    pub service_account_annotations: BTreeMap<String, BTreeMap<String, String>>,
}

impl PlatformSpec {
    /// The components that run: operator and worker always, the gateway when enabled.
    pub fn components(&self) -> Vec<&'static str> {
        COMPONENTS
            .into_iter()
            .filter(|c| *c != "gateway" || self.gateway_enabled)
            .collect()
    }

    /// The kind of the operator's workload: a StatefulSet when it keeps an audit log.
    pub fn operator_kind(&self) -> &'static str {
        if self.operator_audit.is_some() {
            "StatefulSet"
        } else {
            "Deployment"
        }
    }

    /// In-cluster URL of the gateway Service, when the gateway runs.
    pub fn gateway_url(&self) -> Option<String> {
        self.gateway_enabled.then(|| {
            format!(
                "https://{FULLNAME}-gateway.{}.svc:{}",
                self.namespace, self.gateway_service_port
            )
        })
    }
}

/// The three agentplane CRDs as JSON, ready to apply.
pub fn crds() -> Vec<Json> {
    agentplane_api::crds()
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect()
}

fn labels(component: Option<&str>) -> Json {
    let mut l = json!({
        "app.kubernetes.io/name": FULLNAME,
        "app.kubernetes.io/instance": FULLNAME,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        "app.kubernetes.io/part-of": "agentplane",
    });
    if let Some(c) = component {
        l["app.kubernetes.io/component"] = Json::String(c.into());
    }
    l
}

/// The Deployment selector: the chart's, so either installer selects the same pods.
fn selector(component: &str) -> Json {
    json!({
        "app.kubernetes.io/name": FULLNAME,
        "app.kubernetes.io/instance": FULLNAME,
        "app.kubernetes.io/component": component,
    })
}

fn meta(name: &str, ns: &str, component: Option<&str>) -> Json {
    json!({ "name": name, "namespace": ns, "labels": labels(component) })
}

fn env(name: &str, value: impl Into<String>) -> Json {
    json!({ "name": name, "value": value.into() })
}

/// A downward-API variable. `fieldRef` is an atomic struct whose `apiVersion` the server
/// defaults to `v1`; leaving it out would make the applied value differ from the stored one,
/// which shows as a conflict as soon as another manager applies the same field.
fn field_env(name: &str, path: &str) -> Json {
    json!({ "name": name, "valueFrom": { "fieldRef": { "apiVersion": "v1", "fieldPath": path } } })
}

/// `tiers.yaml` of the models ConfigMap (`AGENTPLANE_MODEL_TIERS_FILE`).
pub fn tiers_yaml(tiers: &[ModelTier]) -> String {
    serde_yaml::to_string(&json!({ "tiers": tiers })).unwrap_or_else(|_| "tiers: []\n".into())
}

/// FNV-1a: a stable checksum for the pod-template annotation that rolls the pods when the
/// tiers change (std's hasher is not guaranteed stable across Rust releases).
pub fn checksum(data: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Environment every component receives.
fn common_env(s: &PlatformSpec, component: &str) -> Vec<Json> {
    let mut e = vec![
        env("AGENTPLANE_NAMESPACE", s.namespace.as_str()),
        field_env("AGENTPLANE_POD_NAME", "metadata.name"),
        field_env("AGENTPLANE_POD_NAMESPACE", "metadata.namespace"),
        env("AGENTPLANE_LOG_FORMAT", s.log_format.as_str()),
        env("RUST_LOG", s.log_level.as_str()),
        env(
            "AGENTPLANE_METRICS_LISTEN",
            format!("0.0.0.0:{METRICS_PORT}"),
        ),
    ];
    if let Some(r) = &s.region {
        e.push(env("AWS_REGION", r.as_str()));
    }
    if let Some(u) = &s.aws_endpoint_url {
        e.push(env("AWS_ENDPOINT_URL", u.as_str()));
    }
    e.push(env("OTEL_SERVICE_NAME", format!("agentplane-{component}")));
    e
}

/// Queue settings (operator and worker).
fn queue_env(s: &PlatformSpec) -> Vec<Json> {
    vec![
        env("AGENTPLANE_QUEUE_URL", s.queue_url.as_str()),
        env("AGENTPLANE_DLQ_URL", s.dlq_url.as_str()),
        env("AGENTPLANE_QUEUE_FIFO", s.queue_fifo.to_string()),
        env(
            "AGENTPLANE_VISIBILITY_TIMEOUT_SECS",
            s.visibility_timeout_seconds.to_string(),
        ),
        env(
            "AGENTPLANE_MAX_RECEIVE_COUNT",
            s.max_receive_count.to_string(),
        ),
        env("AGENTPLANE_MODEL_TIERS_FILE", TIERS_FILE),
    ]
}

fn probes() -> (Json, Json, Json) {
    let get = json!({ "path": "/healthz", "port": "metrics" });
    (
        json!({ "httpGet": get, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3 }),
        json!({ "httpGet": get, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3 }),
        json!({ "httpGet": get, "periodSeconds": 2, "failureThreshold": 30 }),
    )
}

fn pod_security_context() -> Json {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

fn container_security_context() -> Json {
    json!({
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "privileged": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

fn resources(component: &str) -> Json {
    match component {
        "worker" => {
            json!({ "requests": { "cpu": "250m", "memory": "256Mi" }, "limits": { "memory": "1Gi" } })
        }
        _ => {
            json!({ "requests": { "cpu": "100m", "memory": "128Mi" }, "limits": { "memory": "256Mi" } })
        }
    }
}

/// The audit log's environment (the chart's `agentplane.auditEnv`). The origin ends in the pod's
/// name, which Kubernetes expands from `AGENTPLANE_POD_NAME` (defined earlier, by common_env):
/// each replica keeps its own log, and a checkpoint must name the log it belongs to.
fn audit_env(s: &PlatformSpec, audit: &AuditSpec) -> Vec<Json> {
    let mut e = vec![
        env("AGENTPLANE_AUDIT_LOG", format!("{AUDIT_DIR}/audit.sqlite")),
        env(
            "AGENTPLANE_AUDIT_ORIGIN",
            format!(
                "agentplane.dev/audit/{}/$(AGENTPLANE_POD_NAME)",
                s.namespace
            ),
        ),
    ];
    e.push(match &audit.kms_key_arn {
        Some(key) => env("AGENTPLANE_AUDIT_KMS_KEY_ID", key.as_str()),
        None => env(
            "AGENTPLANE_AUDIT_KEY_FILE",
            format!("{AUDIT_DIR}/audit.key"),
        ),
    });
    e
}

/// The StatefulSet-only part of the operator's spec: a volume per replica, kept when the
/// StatefulSet is deleted or scaled down (they hold the audit logs).
fn audit_statefulset_spec(spec: &mut Json, audit: &AuditSpec) {
    let mut claim = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": { "requests": { "storage": audit.storage_size } },
    });
    if let Some(class) = &audit.storage_class {
        claim["storageClassName"] = json!(class);
    }
    spec["serviceName"] = json!(format!("{FULLNAME}-operator-metrics"));
    // The Lease picks the leader: no replica has to wait for another to start.
    spec["podManagementPolicy"] = json!("Parallel");
    spec["persistentVolumeClaimRetentionPolicy"] =
        json!({ "whenDeleted": "Retain", "whenScaled": "Retain" });
    spec["volumeClaimTemplates"] = json!([{ "metadata": { "name": AUDIT_VOLUME }, "spec": claim }]);
}

/// The Deployment of a component; the operator's is a StatefulSet when it keeps an audit log.
fn workload(s: &PlatformSpec, component: &str) -> Json {
    let ns = s.namespace.as_str();
    let name = format!("{FULLNAME}-{component}");
    let (liveness, readiness, startup) = probes();
    let mut env = common_env(s, component);
    let mut ports = vec![];
    let mut mounts = vec![];
    let mut volumes = vec![];
    let (grace, tmp_size) = match component {
        "operator" => {
            env.extend(queue_env(s));
            env.push(self::env(
                "AGENTPLANE_LEASE_NAME",
                format!("{FULLNAME}-operator"),
            ));
            env.push(self::env("AGENTPLANE_LEASE_NAMESPACE", ns));
            env.push(self::env(
                "AGENTPLANE_CONCURRENCY",
                s.operator_concurrency.to_string(),
            ));
            if let Some(audit) = &s.operator_audit {
                env.extend(audit_env(s, audit));
            }
            (30, "64Mi")
        }
        "worker" => {
            env.extend(queue_env(s));
            env.push(self::env(
                "AGENTPLANE_KMS_KEY_ID",
                s.kms_key_arn.clone().unwrap_or_default(),
            ));
            env.push(self::env(
                "AGENTPLANE_WORKERS",
                s.worker_concurrency.to_string(),
            ));
            (120, "256Mi")
        }
        _ => {
            env.push(self::env(
                "AGENTPLANE_LISTEN",
                format!("0.0.0.0:{}", s.gateway_port),
            ));
            env.push(self::env(
                "AGENTPLANE_TLS_CERT",
                "/etc/agentplane/tls/tls.crt",
            ));
            env.push(self::env(
                "AGENTPLANE_TLS_KEY",
                "/etc/agentplane/tls/tls.key",
            ));
            ports.push(
                json!({ "name": "https", "containerPort": s.gateway_port, "protocol": "TCP" }),
            );
            (30, "64Mi")
        }
    };
    ports.push(json!({ "name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP" }));
    if component == "gateway" {
        mounts.push(json!({ "name": "tls", "mountPath": "/etc/agentplane/tls", "readOnly": true }));
        volumes
            .push(json!({ "name": "tls", "secret": { "secretName": s.gateway_tls_secret_name } }));
    } else {
        mounts.push(
            json!({ "name": "models", "mountPath": "/etc/agentplane/models", "readOnly": true }),
        );
        volumes.push(json!({ "name": "models", "configMap": { "name": MODELS_CONFIGMAP } }));
    }
    mounts.push(json!({ "name": "tmp", "mountPath": "/tmp" }));
    volumes.push(json!({ "name": "tmp", "emptyDir": { "sizeLimit": tmp_size } }));
    let audit = s
        .operator_audit
        .as_ref()
        .filter(|_| component == "operator");
    if audit.is_some() {
        // The volume itself comes from the StatefulSet's claim template.
        mounts.push(json!({ "name": AUDIT_VOLUME, "mountPath": AUDIT_DIR }));
    }

    let mut container = json!({
        "name": component,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "args": [component],
        "env": env,
        "ports": ports,
        "livenessProbe": liveness,
        "readinessProbe": readiness,
        "startupProbe": startup,
        "resources": resources(component),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    });
    if component == "gateway"
        && let Some(secret) = &s.gateway_credentials_secret
    {
        container["envFrom"] = json!([{ "secretRef": { "name": secret } }]);
    }
    let mut template_meta = json!({ "labels": selector(component) });
    if component != "gateway" {
        template_meta["annotations"] =
            json!({ "checksum/models": checksum(&tiers_yaml(&s.model_tiers)) });
    }
    let mut spec = json!({
        "revisionHistoryLimit": 5,
        "selector": { "matchLabels": selector(component) },
        "template": {
            "metadata": template_meta,
            "spec": {
                "serviceAccountName": name,
                "terminationGracePeriodSeconds": grace,
                "securityContext": pod_security_context(),
                "containers": [container],
                "volumes": volumes,
            },
        },
    });
    let replicas = match component {
        "operator" => Some(s.operator_replicas),
        "worker" => s.worker_replicas,
        _ => Some(s.gateway_replicas),
    };
    if let Some(r) = replicas {
        spec["replicas"] = json!(r);
    }
    if let Some(audit) = audit {
        audit_statefulset_spec(&mut spec, audit);
    }
    let kind = if component == "operator" {
        s.operator_kind()
    } else {
        "Deployment"
    };
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": meta(&name, ns, Some(component)),
        "spec": spec,
    })
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> Json {
    json!({ "apiGroups": [group], "resources": resources, "verbs": verbs })
}

fn named_rule(group: &str, resources: &[&str], names: &[String], verbs: &[&str]) -> Json {
    json!({ "apiGroups": [group], "resources": resources, "resourceNames": names, "verbs": verbs })
}

/// templates/approval-guard.yaml: an admission policy refusing any change of an AgentTask's
/// `status.approval` by anyone but the operator's ServiceAccount (RBAC cannot limit a status write
/// to some fields, and workers must write task status).
fn approval_guard(ns: &str) -> Vec<Json> {
    let name = format!("{FULLNAME}-{ns}-approval-record");
    let operator = format!("system:serviceaccount:{ns}:{FULLNAME}-operator");
    let labels = labels(Some("operator"));
    vec![
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": { "resourceRules": [{
                    "apiGroups": ["agentplane.dev"],
                    "apiVersions": ["v1alpha1"],
                    "operations": ["UPDATE"],
                    "resources": ["agenttasks/status"],
                }]},
                "variables": [
                    { "name": "before", "expression": "has(oldObject.status) && has(oldObject.status.approval)" },
                    { "name": "after", "expression": "has(object.status) && has(object.status.approval)" },
                ],
                "validations": [{
                    "expression": format!("request.userInfo.username == '{operator}' || (variables.before == variables.after && (!variables.after || object.status.approval == oldObject.status.approval))"),
                    "message": "status.approval is the operator's record of an accepted decision; record a decision as an AgentApproval through the gateway",
                    "reason": "Forbidden",
                }],
            },
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": { "namespaceSelector": { "matchLabels": {
                    "kubernetes.io/metadata.name": ns,
                }}},
            },
        }),
    ]
}

/// Least-privilege rules per component: templates/rbac.yaml, rule for rule.
pub fn rules(s: &PlatformSpec, component: &str) -> Vec<Json> {
    const AP: &str = "agentplane.dev";
    let events = [
        rule("", &["events"], &["create", "patch"]),
        rule("events.k8s.io", &["events"], &["create", "patch"]),
    ];
    match component {
        "operator" => {
            let mut r = vec![
                rule(
                    AP,
                    &["agenttasks", "edgedevices", "agentpolicies"],
                    &["get", "list", "watch", "patch"],
                ),
                rule(
                    AP,
                    &[
                        "agenttasks/status",
                        "edgedevices/status",
                        "agentpolicies/status",
                    ],
                    &["get", "patch", "update"],
                ),
                rule(AP, &["agentapprovals"], &["get", "list", "watch"]),
            ];
            r.extend(events);
            r
        }
        "worker" => {
            let mut r = vec![
                rule(AP, &["agenttasks"], &["get", "list", "watch"]),
                rule(AP, &["agenttasks/status"], &["get", "patch", "update"]),
                rule(AP, &["agentpolicies"], &["get", "list", "watch"]),
                // The plan journal: one AgentTaskStep per step, never deleted by a worker (the
                // garbage collector removes them with their task).
                rule(
                    AP,
                    &["agenttasksteps"],
                    &["create", "get", "list", "update"],
                ),
            ];
            r.extend(events);
            if !s.worker_secret_names.is_empty() {
                r.push(named_rule(
                    "",
                    &["secrets"],
                    &s.worker_secret_names,
                    &["get"],
                ));
            }
            r
        }
        _ => vec![
            rule(
                AP,
                &["agenttasks"],
                &["create", "get", "list", "watch", "patch"],
            ),
            rule(AP, &["agenttasks/status"], &["get", "patch"]),
            rule(AP, &["agentapprovals"], &["create"]),
            rule(AP, &["edgedevices"], &["get", "create", "patch"]),
            rule(AP, &["edgedevices/status"], &["get", "patch"]),
            rule(AP, &["agentpolicies"], &["get", "list", "watch"]),
            named_rule(
                "",
                &["secrets"],
                &[JOIN_TOKENS_SECRET.to_string()],
                &["get", "update"],
            ),
        ],
    }
}

fn role_binding(name: &str, ns: &str, sa: &str, component: &str) -> Json {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(name, ns, Some(component)),
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
        "subjects": [{ "kind": "ServiceAccount", "name": sa, "namespace": ns }],
    })
}

/// Every runtime object, in apply order (a namespace first, Deployments after what they use).
/// CRDs are separate ([`crds`]): they are installed and awaited before any of these.
pub fn manifests(s: &PlatformSpec) -> Vec<Json> {
    let ns = s.namespace.as_str();
    let components = s.components();
    let mut out = Vec::new();
    if s.create_namespace {
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns, "labels": labels(None) },
        }));
    }
    for c in &components {
        let mut m = meta(&format!("{FULLNAME}-{c}"), ns, Some(c));
        if let Some(a) = s.service_account_annotations.get(*c)
            && !a.is_empty()
        {
            m["annotations"] = json!(a);
        }
        out.push(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": m,
            "automountServiceAccountToken": true,
        }));
    }
    for c in &components {
        let name = format!("{FULLNAME}-{c}");
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(&name, ns, Some(c)),
            "rules": rules(s, c),
        }));
        out.push(role_binding(&name, ns, &name, c));
    }
    let le = format!("{FULLNAME}-operator-leader-election");
    let lease = format!("{FULLNAME}-operator");
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(&le, ns, Some("operator")),
        "rules": [
            // `create` cannot be limited by name; everything else is limited to the one Lease.
            rule("coordination.k8s.io", &["leases"], &["create"]),
            named_rule("coordination.k8s.io", &["leases"], &[lease], &["get", "watch", "update", "patch"]),
        ],
    }));
    out.push(role_binding(
        &le,
        ns,
        &format!("{FULLNAME}-operator"),
        "operator",
    ));
    out.extend(approval_guard(ns));
    if s.gateway_enabled {
        // Created empty: the gateway keeps join-token hashes in it, and we never own its data.
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta(JOIN_TOKENS_SECRET, ns, Some("gateway")),
            "type": "Opaque",
        }));
    }
    out.push(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(MODELS_CONFIGMAP, ns, None),
        "data": { "tiers.yaml": tiers_yaml(&s.model_tiers) },
    }));
    for c in &components {
        out.push(workload(s, c));
    }
    for c in &components {
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(&format!("{FULLNAME}-{c}-metrics"), ns, Some(c)),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(c),
                "ports": [{ "name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP" }],
            },
        }));
    }
    if s.gateway_enabled {
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(&format!("{FULLNAME}-gateway"), ns, Some("gateway")),
            "spec": {
                "type": s.gateway_service_type,
                "selector": selector("gateway"),
                "ports": [{ "name": "https", "port": s.gateway_service_port, "targetPort": "https", "protocol": "TCP" }],
            },
        }));
    }
    for c in &components {
        out.push(json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(&format!("{FULLNAME}-{c}"), ns, Some(c)),
            "spec": { "maxUnavailable": 1, "selector": { "matchLabels": selector(c) } },
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn spec() -> PlatformSpec {
        PlatformSpec {
            namespace: "ap".into(),
            create_namespace: true,
            image: "ghcr.io/agentplane/agentplane:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            queue_url: "http://127.0.0.1:5000/1/q".into(),
            dlq_url: "http://127.0.0.1:5000/1/q-dlq".into(),
            queue_fifo: false,
            visibility_timeout_seconds: 300,
            max_receive_count: 5,
            region: Some("us-east-1".into()),
            aws_endpoint_url: None,
            kms_key_arn: Some("arn:aws:kms:us-east-1:1:key/k".into()),
            model_tiers: vec![],
            log_level: "info".into(),
            log_format: "json".into(),
            operator_replicas: 2,
            operator_concurrency: 16,
            operator_audit: None,
            worker_replicas: None,
            worker_concurrency: 4,
            worker_secret_names: vec![],
            gateway_enabled: true,
            gateway_replicas: 2,
            gateway_port: 8443,
            gateway_service_type: "ClusterIP".into(),
            gateway_service_port: 443,
            gateway_tls_secret_name: "agentplane-gateway-tls".into(),
            gateway_credentials_secret: None,
            service_account_annotations: BTreeMap::new(),
        }
    }

    fn env_of(d: &Json) -> BTreeMap<String, String> {
        d["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    #[test]
    fn worker_gets_the_env_contract() {
        let m = manifests(&spec());
        let w = m
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "agentplane-worker")
            .unwrap();
        let e = env_of(w);
        assert_eq!(e["AGENTPLANE_QUEUE_URL"], "http://127.0.0.1:5000/1/q");
        assert_eq!(e["AGENTPLANE_KMS_KEY_ID"], "arn:aws:kms:us-east-1:1:key/k");
        assert_eq!(e["AGENTPLANE_MODEL_TIERS_FILE"], TIERS_FILE);
        assert_eq!(e["AWS_REGION"], "us-east-1");
        assert!(
            w["spec"].get("replicas").is_none(),
            "worker replicas left to KEDA"
        );
    }

    #[test]
    fn gateway_disabled_drops_its_objects() {
        let mut s = spec();
        s.gateway_enabled = false;
        let m = manifests(&s);
        assert!(m.iter().all(
            |o| !o["metadata"]["name"].as_str().unwrap().contains("gateway")
                && o["metadata"]["name"] != JOIN_TOKENS_SECRET
        ));
        assert_eq!(s.gateway_url(), None);
    }

    fn operator(m: &[Json]) -> &Json {
        let found: Vec<&Json> = m
            .iter()
            .filter(|o| o["metadata"]["name"] == "agentplane-operator")
            .filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet")
            .collect();
        assert_eq!(found.len(), 1, "one operator workload");
        found[0]
    }

    #[test]
    fn audit_runs_the_operator_as_a_statefulset() {
        let mut s = spec();
        assert_eq!(operator(&manifests(&s))["kind"], "Deployment");
        s.operator_audit = Some(AuditSpec {
            kms_key_arn: None,
            storage_size: "1Gi".into(),
            storage_class: None,
        });
        let m = manifests(&s);
        let sts = operator(&m);
        assert_eq!(sts["kind"], "StatefulSet");
        assert_eq!(s.operator_kind(), "StatefulSet");
        assert_eq!(sts["spec"]["serviceName"], "agentplane-operator-metrics");
        assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
        let e = env_of(sts);
        assert_eq!(
            e["AGENTPLANE_AUDIT_LOG"],
            "/var/lib/agentplane/audit/audit.sqlite"
        );
        assert_eq!(
            e["AGENTPLANE_AUDIT_ORIGIN"],
            "agentplane.dev/audit/ap/$(AGENTPLANE_POD_NAME)"
        );
        assert_eq!(
            e["AGENTPLANE_AUDIT_KEY_FILE"],
            "/var/lib/agentplane/audit/audit.key"
        );
        assert!(!e.contains_key("AGENTPLANE_AUDIT_KMS_KEY_ID"));
        let claim = &sts["spec"]["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"]["name"], "audit");
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
        assert!(claim["spec"].get("storageClassName").is_none());
        let mounts = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].to_string();
        assert!(mounts.contains("/var/lib/agentplane/audit"), "{mounts}");
        // The worker and gateway are untouched.
        let worker = m
            .iter()
            .find(|o| o["metadata"]["name"] == "agentplane-worker" && o["kind"] == "Deployment")
            .unwrap();
        assert!(!worker.to_string().contains("AUDIT"));

        s.operator_audit = Some(AuditSpec {
            kms_key_arn: Some("arn:aws:kms:us-east-1:1:key/audit".into()),
            storage_size: "5Gi".into(),
            storage_class: Some("gp3".into()),
        });
        let m = manifests(&s);
        let sts = operator(&m);
        let e = env_of(sts);
        assert_eq!(
            e["AGENTPLANE_AUDIT_KMS_KEY_ID"],
            "arn:aws:kms:us-east-1:1:key/audit"
        );
        assert!(!e.contains_key("AGENTPLANE_AUDIT_KEY_FILE"));
        let claim = &sts["spec"]["volumeClaimTemplates"][0]["spec"];
        assert_eq!(claim["storageClassName"], "gp3");
        assert_eq!(claim["resources"]["requests"]["storage"], "5Gi");
    }

    #[test]
    fn no_wildcards_in_rbac() {
        for o in manifests(&spec()).iter().filter(|o| o["kind"] == "Role") {
            let text = o["rules"].to_string();
            assert!(!text.contains('*'), "{text}");
        }
    }

    #[test]
    fn checksum_is_stable() {
        assert_eq!(checksum(""), "cbf29ce484222325");
        assert_ne!(checksum("tiers: []\n"), checksum("tiers:\n- name: a\n"));
    }
}
