//! The XRDs' schemas enforced by a real kube-apiserver: the CRDs Crossplane would generate from
//! v1/xrd.yaml (the composite XAgentPlatform and the claim AgentPlatform) and v2/xrd.yaml (the
//! namespaced AgentPlatform) accept the examples with their defaults applied, and reject
//! out-of-range values through OpenAPI bounds and CEL rules.
//!
//! Without a running Crossplane the CRDs are derived here, as Crossplane's `xcrd` package does,
//! in a reduced form: the XRD version's schema verbatim (with its defaults, bounds and
//! `x-kubernetes-validations`), plus the fields Crossplane adds to every XR or claim (composition
//! selection, references, `status.conditions`) as open objects, a status subresource and the
//! printer columns. Only the fields Crossplane adds are simplified; the platform's own schema is
//! exactly what users get.

mod common;

use common::{CrdIndex, comp_dir, dry_run_create, read_yaml, set_path};
use kube::api::{Patch, PatchParams};
use serde_json::{Map, Value, json};

fn open_object() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavour {
    /// v1 XRD, the cluster-scoped composite.
    LegacyComposite,
    /// v1 XRD, the namespaced claim.
    Claim,
    /// v2 XRD, the namespaced composite.
    Composite,
}

/// The CRD Crossplane generates for `flavour` from `xrd` (see the module comment).
fn crd_from_xrd(xrd: &Value, flavour: Flavour) -> Value {
    let spec = &xrd["spec"];
    let group = spec["group"].as_str().expect("group");
    let names = if flavour == Flavour::Claim {
        &spec["claimNames"]
    } else {
        &spec["names"]
    };
    let kind = names["kind"].as_str().expect("kind");
    let plural = names["plural"].as_str().expect("plural");
    let scope = match flavour {
        Flavour::LegacyComposite => "Cluster",
        Flavour::Claim => "Namespaced",
        Flavour::Composite => spec["scope"].as_str().unwrap_or("Namespaced"),
    };
    let (spec_fields, status_fields): (&[&str], &[&str]) = match flavour {
        Flavour::LegacyComposite => (
            &[
                "compositionRef",
                "compositionSelector",
                "compositionRevisionRef",
                "compositionRevisionSelector",
                "claimRef",
                "writeConnectionSecretToRef",
                "publishConnectionDetailsTo",
            ],
            &["connectionDetails"],
        ),
        Flavour::Claim => (
            &[
                "compositionRef",
                "compositionSelector",
                "compositionRevisionRef",
                "compositionRevisionSelector",
                "resourceRef",
                "writeConnectionSecretToRef",
                "publishConnectionDetailsTo",
            ],
            &["connectionDetails"],
        ),
        Flavour::Composite => (&["crossplane"], &[]),
    };
    let versions: Vec<Value> = spec["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| {
            let schema = &v["schema"]["openAPIV3Schema"];
            let mut xr_spec = schema["properties"]["spec"].clone();
            let props = xr_spec["properties"].as_object_mut().expect("spec properties");
            for f in spec_fields {
                props.insert((*f).to_owned(), open_object());
            }
            if flavour != Flavour::Composite {
                props.insert("compositionUpdatePolicy".into(), json!({"type": "string", "enum": ["Automatic", "Manual"]}));
            }
            if flavour == Flavour::LegacyComposite {
                props.insert("resourceRefs".into(), json!({"type": "array", "items": open_object()}));
            }
            if flavour == Flavour::Claim {
                props.insert("compositeDeletePolicy".into(), json!({"type": "string", "enum": ["Background", "Foreground"]}));
            }
            let mut status = schema["properties"].get("status").cloned().unwrap_or(json!({"type": "object"}));
            let sprops = status
                .as_object_mut()
                .expect("status")
                .entry("properties")
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("status properties");
            sprops.insert("conditions".into(), json!({"type": "array", "items": open_object()}));
            for f in status_fields {
                sprops.insert((*f).to_owned(), open_object());
            }
            json!({
                "name": v["name"],
                "served": v["served"],
                "storage": v["referenceable"],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": xr_spec,
                        "status": status,
                    },
                }},
                "subresources": {"status": {}},
                "additionalPrinterColumns": v.get("additionalPrinterColumns").cloned().unwrap_or(json!([])),
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
            "scope": scope,
            "versions": versions,
        },
    })
}

fn xrds() -> (Value, Value) {
    (
        read_yaml(&comp_dir().join("v1/xrd.yaml")).unwrap(),
        read_yaml(&comp_dir().join("v2/xrd.yaml")).unwrap(),
    )
}

async fn install_generated(client: &kube::Client) -> CrdIndex {
    let (v1, v2) = xrds();
    let crds = [
        crd_from_xrd(&v1, Flavour::LegacyComposite),
        crd_from_xrd(&v1, Flavour::Claim),
        crd_from_xrd(&v2, Flavour::Composite),
    ];
    common::install_crd_values(client, &crds)
        .await
        .expect("install the generated CRDs")
}

/// The three valid objects: the example claim, the claim's composite, the example v2 XR.
fn valid_objects(ns: &str) -> Vec<(&'static str, Value)> {
    let mut claim = read_yaml(&comp_dir().join("examples/claim.yaml")).unwrap();
    let xr = read_yaml(&comp_dir().join("tests/fixtures/xagentplatform.yaml")).unwrap();
    let mut v2 = read_yaml(&comp_dir().join("examples/xr-v2.yaml")).unwrap();
    set_path(&mut claim, "/metadata/namespace", json!(ns));
    set_path(&mut v2, "/metadata/namespace", json!(ns));
    vec![("v1 claim", claim), ("v1 composite", xr), ("v2 XR", v2)]
}

/// The v1 and v2 XRDs share one schema; the composite fixture is the example claim's.
#[test]
fn schemas_and_examples_agree() {
    let (v1, v2) = xrds();
    assert_eq!(
        v1["spec"]["versions"], v2["spec"]["versions"],
        "v1/xrd.yaml and v2/xrd.yaml versions differ"
    );
    let claim = read_yaml(&comp_dir().join("examples/claim.yaml")).unwrap();
    let mut xr = read_yaml(&comp_dir().join("tests/fixtures/xagentplatform.yaml")).unwrap();
    let xr_spec = xr["spec"].as_object_mut().unwrap();
    xr_spec.remove("claimRef");
    xr_spec.remove("compositionRef");
    assert_eq!(
        claim["spec"], xr["spec"],
        "tests/fixtures/xagentplatform.yaml is not the claim's composite"
    );
    let mut v2x = read_yaml(&comp_dir().join("examples/xr-v2.yaml")).unwrap();
    // The v2 example differs only in choosing FIFO queues and turning the audit log on.
    assert_eq!(v2x["spec"]["queue"]["fifo"], true);
    v2x["spec"]["queue"].as_object_mut().unwrap().remove("fifo");
    assert_eq!(v2x["spec"]["audit"]["enabled"], true);
    v2x["spec"].as_object_mut().unwrap().remove("audit");
    assert!(claim["spec"].get("audit").is_none());
    assert_eq!(claim["spec"], v2x["spec"]);
}

#[tokio::test]
async fn generated_crds_accept_the_examples_with_defaults() {
    let stack = agentplane_testsupport::Stack::shared().expect("the local stack");
    let client = stack.kube_client().await.expect("kube client");
    let index = install_generated(&client).await;
    common::ensure_namespace(&client, "xrd-valid")
        .await
        .unwrap();
    for (what, obj) in valid_objects("xrd-valid") {
        let stored = dry_run_create(&client, &index, &obj, "xrd-valid")
            .await
            .unwrap_or_else(|e| panic!("{what} rejected: {e}"));
        let spec = &stored["spec"];
        // Defaults from the XRD schema, applied by the API server.
        assert_eq!(spec["providerConfigName"], "default", "{what}");
        assert_eq!(spec["queue"]["messageRetentionSeconds"], 345600, "{what}");
        assert_eq!(
            spec["queue"]["deadLetterRetentionSeconds"], 1209600,
            "{what}"
        );
        assert_eq!(spec["gpuPool"]["amiType"], "AL2023_x86_64_NVIDIA", "{what}");
        assert_eq!(spec["gpuPool"]["diskSizeGiB"], 100, "{what}");
        assert_eq!(
            spec["systemPool"]["instanceTypes"],
            json!(["m6i.large"]),
            "{what}"
        );
        assert_eq!(spec["systemPool"]["desiredSize"], 2, "{what}");
        assert_eq!(spec["kms"]["enableKeyRotation"], true, "{what}");
        assert_eq!(spec["kms"]["deletionWindowInDays"], 30, "{what}");
        assert_eq!(spec["scaling"]["minReplicas"], 0, "{what}");
        assert_eq!(spec["keda"]["chartVersion"], "2.20.2", "{what}");
        assert_eq!(spec["runtime"]["namespace"], "agentplane", "{what}");
        assert_eq!(spec["cluster"]["endpointPublicAccess"], false, "{what}");
        // The audit log: off by default (the claim); the v2 example turns it on.
        if what == "v2 XR" {
            assert_eq!(
                spec["audit"],
                json!({"enabled": true, "storageSize": "5Gi", "storageClassName": "gp3"}),
                "{what}"
            );
        } else {
            assert_eq!(
                spec["audit"],
                json!({"enabled": false, "storageSize": "1Gi"}),
                "{what}"
            );
        }
    }
    // A minimal spec: only the required fields, everything else defaulted.
    let minimal = json!({
        "apiVersion": "platform.m.agentplane.dev/v1alpha1",
        "kind": "AgentPlatform",
        "metadata": {"name": "minimal", "namespace": "xrd-valid"},
        "spec": {
            "region": "us-east-1",
            "cluster": {"subnetIds": ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]},
            "gpuPool": {"instanceTypes": ["g5.xlarge"]},
            "runtime": {"chartVersion": "1.2.3"},
            "modelTiers": [{"name": "only", "endpointKind": "builtin", "endpoint": "builtin:echo"}],
        },
    });
    let stored = dry_run_create(&client, &index, &minimal, "xrd-valid")
        .await
        .expect("minimal spec accepted");
    assert_eq!(stored["spec"]["cluster"]["version"], "1.33");
    assert_eq!(stored["spec"]["queue"]["maxReceiveCount"], 5);
    assert_eq!(stored["spec"]["scaling"]["queueLength"], 5);
    assert_eq!(
        stored["spec"]["audit"],
        json!({"enabled": false, "storageSize": "1Gi"})
    );
    // The tier defaults of the api crate's ModelTier; a builtin endpoint needs no https.
    let tier = &stored["spec"]["modelTiers"][0];
    assert_eq!(tier["pricePer1kInputMicros"], 0);
    assert_eq!(tier["pricePer1kOutputMicros"], 0);
    assert_eq!(tier["gpu"], false);
    assert_eq!(tier["endpoint"], "builtin:echo");
}

/// (what, path under the object, value, text the API server's rejection must contain)
fn bad_cases() -> Vec<(&'static str, &'static str, Value, &'static str)> {
    vec![
        (
            "region format",
            "/spec/region",
            json!("eu-west"),
            "spec.region in body should match",
        ),
        (
            "cluster version",
            "/spec/cluster/version",
            json!("1.20"),
            "spec.cluster.version in body should match",
        ),
        (
            "one subnet",
            "/spec/cluster/subnetIds",
            json!(["subnet-0a1b2c3d4e5f60001"]),
            "spec.cluster.subnetIds in body should have at least 2 items",
        ),
        (
            "subnet id format",
            "/spec/cluster/subnetIds/1",
            json!("sg-0a1b2c3d"),
            "spec.cluster.subnetIds[1] in body should match",
        ),
        (
            "public CIDRs on a private endpoint",
            "/spec/cluster/publicAccessCidrs",
            json!(["203.0.113.0/24"]),
            "publicAccessCidrs needs endpointPublicAccess",
        ),
        (
            "no instance type",
            "/spec/gpuPool/instanceTypes",
            json!([]),
            "spec.gpuPool.instanceTypes in body should have at least 1 items",
        ),
        (
            "non-GPU instance type",
            "/spec/gpuPool/instanceTypes/0",
            json!("m5.large"),
            "spec.gpuPool.instanceTypes[0] in body should match",
        ),
        (
            "AMI type",
            "/spec/gpuPool/amiType",
            json!("AL2_x86_64"),
            "spec.gpuPool.amiType: Unsupported value: \"AL2_x86_64\"",
        ),
        (
            "pool max above bound",
            "/spec/gpuPool/maxSize",
            json!(101),
            "spec.gpuPool.maxSize in body should be less than or equal to 100",
        ),
        (
            "negative pool min",
            "/spec/gpuPool/minSize",
            json!(-1),
            "spec.gpuPool.minSize in body should be greater than or equal to 0",
        ),
        (
            "pool min above max",
            "/spec/gpuPool/minSize",
            json!(5),
            "gpuPool.minSize must not exceed gpuPool.maxSize",
        ),
        (
            "pool desired above max",
            "/spec/gpuPool/desiredSize",
            json!(9),
            "gpuPool.desiredSize must lie within [minSize, maxSize]",
        ),
        (
            "system pool below one node",
            "/spec/systemPool/minSize",
            json!(0),
            "spec.systemPool.minSize in body should be greater than or equal to 1",
        ),
        (
            "system pool desired above max",
            "/spec/systemPool/desiredSize",
            json!(5),
            "systemPool sizes must satisfy minSize <= desiredSize <= maxSize",
        ),
        (
            "spot not a boolean",
            "/spec/gpuPool/spot",
            json!("yes"),
            "spec.gpuPool.spot in body must be of type boolean",
        ),
        (
            "visibility timeout",
            "/spec/queue/visibilityTimeoutSeconds",
            json!(43201),
            "spec.queue.visibilityTimeoutSeconds in body should be less than or equal to 43200",
        ),
        (
            "retention too short",
            "/spec/queue/messageRetentionSeconds",
            json!(59),
            "spec.queue.messageRetentionSeconds in body should be greater than or equal to 60",
        ),
        (
            "zero receive count",
            "/spec/queue/maxReceiveCount",
            json!(0),
            "spec.queue.maxReceiveCount in body should be greater than or equal to 1",
        ),
        (
            "receive count too high",
            "/spec/queue/maxReceiveCount",
            json!(1001),
            "spec.queue.maxReceiveCount in body should be less than or equal to 1000",
        ),
        (
            "DLQ keeps less than the queue",
            "/spec/queue/deadLetterRetentionSeconds",
            json!(86400),
            "queue.deadLetterRetentionSeconds must be at least queue.messageRetentionSeconds",
        ),
        (
            "rotation period too short",
            "/spec/kms/rotationPeriodInDays",
            json!(30),
            "spec.kms.rotationPeriodInDays in body should be greater than or equal to 90",
        ),
        (
            "rotation period without rotation",
            "/spec/kms/enableKeyRotation",
            json!(false),
            "kms.rotationPeriodInDays needs kms.enableKeyRotation",
        ),
        (
            "deletion window",
            "/spec/kms/deletionWindowInDays",
            json!(3),
            "spec.kms.deletionWindowInDays in body should be greater than or equal to 7",
        ),
        (
            "audit storage size not a quantity",
            "/spec/audit/storageSize",
            json!("lots"),
            "spec.audit.storageSize in body should match",
        ),
        (
            "audit enabled not a boolean",
            "/spec/audit/enabled",
            json!("yes"),
            "spec.audit.enabled in body must be of type boolean",
        ),
        (
            "audit storage class not a DNS subdomain",
            "/spec/audit/storageClassName",
            json!("Fast_SSD"),
            "spec.audit.storageClassName in body should match",
        ),
        (
            "audit storage class empty",
            "/spec/audit/storageClassName",
            json!(""),
            "spec.audit.storageClassName in body should match",
        ),
        (
            "zero queue length",
            "/spec/scaling/queueLength",
            json!(0),
            "spec.scaling.queueLength in body should be greater than or equal to 1",
        ),
        (
            "replicas min above max",
            "/spec/scaling/minReplicas",
            json!(30),
            "scaling.minReplicas must not exceed scaling.maxReplicas",
        ),
        (
            "zero max replicas",
            "/spec/scaling/maxReplicas",
            json!(0),
            "spec.scaling.maxReplicas in body should be greater than or equal to 1",
        ),
        (
            "KEDA chart version",
            "/spec/keda/chartVersion",
            json!("latest"),
            "spec.keda.chartVersion in body should match",
        ),
        (
            "runtime chart version",
            "/spec/runtime/chartVersion",
            json!("v1"),
            "spec.runtime.chartVersion in body should match",
        ),
        (
            "runtime chart repository",
            "/spec/runtime/chartRepository",
            json!("ftp://charts"),
            "spec.runtime.chartRepository in body should match",
        ),
        (
            "no model tier",
            "/spec/modelTiers",
            json!([]),
            "spec.modelTiers in body should have at least 1 items",
        ),
        (
            "duplicate model tier",
            "/spec/modelTiers/1/name",
            json!("large"),
            "spec.modelTiers[1]: Duplicate value",
        ),
        (
            "model endpoint kind",
            "/spec/modelTiers/0/endpointKind",
            json!("gpt"),
            "spec.modelTiers[0].endpointKind: Unsupported value",
        ),
        (
            "model endpoint kind of the old XRD shape",
            "/spec/modelTiers/1/endpointKind",
            json!("vllm"),
            "spec.modelTiers[1].endpointKind: Unsupported value: \"vllm\"",
        ),
        (
            "http remote model endpoint",
            "/spec/modelTiers/1/endpoint",
            json!("http://vllm.models.svc:8000/v1"),
            "remote model endpoints must use https",
        ),
        (
            "empty model endpoint",
            "/spec/modelTiers/0/endpoint",
            json!(""),
            "spec.modelTiers[0].endpoint in body should be at least 1 chars long",
        ),
        (
            "model tier name too long",
            "/spec/modelTiers/0/name",
            json!("t".repeat(64)),
            "spec.modelTiers[0].name: Too long",
        ),
        (
            "too many model tiers",
            "/spec/modelTiers",
            Value::Array(
                (0..17)
                    .map(|i| json!({"name": format!("t{i}"), "endpointKind": "builtin", "endpoint": "builtin:echo"}))
                    .collect(),
            ),
            "spec.modelTiers: Too many: 17",
        ),
        (
            "negative input price",
            "/spec/modelTiers/0/pricePer1kInputMicros",
            json!(-1),
            "spec.modelTiers[0].pricePer1kInputMicros in body should be greater than or equal to 0",
        ),
        (
            "negative output price",
            "/spec/modelTiers/1/pricePer1kOutputMicros",
            json!(-1),
            "spec.modelTiers[1].pricePer1kOutputMicros in body should be greater than or equal to 0",
        ),
        (
            "model privacy level",
            "/spec/modelTiers/0/privacyLevels/0",
            json!("secret"),
            "spec.modelTiers[0].privacyLevels[0]: Unsupported value",
        ),
        (
            "model secret without a key",
            "/spec/modelTiers/0/secretRef",
            json!({"name": "anthropic-api-key"}),
            "spec.modelTiers[0].secretRef.key: Required value",
        ),
        (
            "region missing",
            "/spec/region",
            Value::Null,
            "spec.region: Required value",
        ),
    ]
}

#[tokio::test]
async fn generated_crds_reject_out_of_range_values() {
    let stack = agentplane_testsupport::Stack::shared().expect("the local stack");
    let client = stack.kube_client().await.expect("kube client");
    let index = install_generated(&client).await;
    common::ensure_namespace(&client, "xrd-invalid")
        .await
        .unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (what, valid) in valid_objects("xrd-invalid") {
        for (case, path, value, expect) in bad_cases() {
            let mut obj = valid.clone();
            if value.is_null() {
                let (parent, key) = path.rsplit_once('/').unwrap();
                obj.pointer_mut(parent)
                    .and_then(Value::as_object_mut)
                    .unwrap()
                    .remove(key);
            } else {
                set_path(&mut obj, path, value);
            }
            checked += 1;
            match common::dry_run_post(&client, &index, &obj, "xrd-invalid").await {
                Ok(_) => failures.push(format!("{what}: {case}: accepted")),
                Err(e) if !e.contains(expect) => failures.push(format!(
                    "{what}: {case}: rejected, but without {expect:?}: {e}"
                )),
                Err(e) if !e.starts_with("422 Invalid") => {
                    failures.push(format!("{what}: {case}: not a 422: {e}"))
                }
                Err(_) => {}
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} bad inputs not rejected as expected:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checked, 3 * bad_cases().len());
}

/// The message of the XRD's transition rule on `spec.audit`.
const AUDIT_STORAGE_FIXED: &str =
    "audit.storageSize and audit.storageClassName cannot change while audit is enabled";

/// Transition rules: the region and the queue type cannot change once the platform exists, nor
/// the audit volumes' size and class while the audit log is on (the operator StatefulSet's
/// volumeClaimTemplates are immutable).
#[tokio::test]
async fn generated_crds_keep_region_fifo_and_audit_storage_immutable() {
    let stack = agentplane_testsupport::Stack::shared().expect("the local stack");
    let client = stack.kube_client().await.expect("kube client");
    let index = install_generated(&client).await;
    common::ensure_namespace(&client, "xrd-immutable")
        .await
        .unwrap();
    for (what, obj) in valid_objects("xrd-immutable") {
        let api = index.api_for(&client, &obj, "xrd-immutable").unwrap();
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let mut obj = obj;
        obj["metadata"].as_object_mut().unwrap().remove("uid");
        api.patch(
            &name,
            &PatchParams::apply(common::FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: create: {e}"));
        for (path, value, expect) in [
            ("/spec/region", json!("eu-central-1"), "region is immutable"),
            (
                "/spec/queue/fifo",
                json!(obj["spec"]["queue"]["fifo"] != true),
                "queue.fifo is immutable",
            ),
        ] {
            let mut changed = obj.clone();
            set_path(&mut changed, path, value);
            let err = dry_run_create(&client, &index, &changed, "xrd-immutable")
                .await
                .expect_err("an immutable field changed");
            assert!(err.contains(expect), "{what}: expected {expect:?} in {err}");
        }
        // The audit volumes: fixed while the log is on (the v2 example), free while it is off.
        let audit_on = obj["spec"]["audit"]["enabled"] == true;
        for (path, value) in [
            ("/spec/audit/storageSize", json!("20Gi")),
            ("/spec/audit/storageClassName", json!("io2")),
        ] {
            let mut changed = obj.clone();
            set_path(&mut changed, path, value);
            let res = dry_run_create(&client, &index, &changed, "xrd-immutable").await;
            if audit_on {
                let err = res.expect_err("audit storage changed while enabled");
                assert!(err.contains(AUDIT_STORAGE_FIXED), "{what}: {path}: {err}");
            } else {
                res.unwrap_or_else(|e| panic!("{what}: {path} rejected while audit is off: {e}"));
            }
        }
        // Turning the log off (or on) may come with a new size.
        let mut toggled = obj.clone();
        set_path(&mut toggled, "/spec/audit/enabled", json!(!audit_on));
        set_path(&mut toggled, "/spec/audit/storageSize", json!("20Gi"));
        dry_run_create(&client, &index, &toggled, "xrd-immutable")
            .await
            .unwrap_or_else(|e| panic!("{what}: toggling audit rejected: {e}"));
        // An allowed change still goes through.
        let mut scaled = obj.clone();
        set_path(&mut scaled, "/spec/scaling/maxReplicas", json!(40));
        dry_run_create(&client, &index, &scaled, "xrd-immutable")
            .await
            .unwrap_or_else(|e| panic!("{what}: scaling change rejected: {e}"));
    }
}
