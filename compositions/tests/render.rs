//! `crossplane render` of both compositions with the real functions running as local processes,
//! through every simulated reconcile until the output settles, checked against golden files.
//!
//! Golden files (tests/golden/): `<v>-pass1.yaml` (a new XR, nothing observed yet),
//! `<v>-observed.yaml` (the observed resources of the last pass), `<v>-converged.yaml` (the
//! settled output) and `<v>-convergence.yaml` (per pass: what was desired, the XR's Ready
//! condition and status fields). `UPDATE_GOLDEN=1` rewrites them.

mod common;

use common::{Functions, Pass, Variant, composed, find, resource_name, str_at};
use serde_json::{Value, json};

const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const KEY_ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
/// The audit checkpoint signing key's ARN (tests/fixtures/provider-status.yaml, `audit-key`).
const AUDIT_KEY_ARN: &str =
    "arn:aws:kms:eu-west-1:111122223333:key/5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9";
const ENDPOINT: &str = "https://0123456789ABCDEF0123456789ABCDEF.gr7.eu-west-1.eks.amazonaws.com";

fn xr_ready(docs: &[Value]) -> &Value {
    docs[0]["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .expect("the rendered XR has a Ready condition")
}

fn summary(passes: &[Pass]) -> String {
    let mut out = Vec::new();
    for (i, p) in passes.iter().enumerate() {
        let desired: Vec<&str> = composed(&p.docs)
            .into_iter()
            .filter_map(resource_name)
            .collect();
        let observed: Vec<&str> = p.observed.iter().filter_map(resource_name).collect();
        let ready = xr_ready(&p.docs);
        let status_in: Vec<&String> =
            p.xr.get("status")
                .and_then(Value::as_object)
                .map(|s| s.keys().filter(|k| *k != "conditions").collect())
                .unwrap_or_default();
        let status_out: Vec<&String> = p.docs[0]["status"]
            .as_object()
            .map(|s| s.keys().filter(|k| *k != "conditions").collect())
            .unwrap_or_default();
        out.push(json!({
            "pass": i + 1,
            "xrStatusIn": status_in,
            "observed": observed,
            "desired": desired,
            "xrStatusOut": status_out,
            "ready": {"status": ready["status"], "reason": ready["reason"], "message": ready.get("message")},
        }));
    }
    serde_yaml::to_string(&out).expect("yaml")
}

fn run(variant: Variant) {
    let fns = Functions::start().expect("start the composition functions");
    let passes = common::converge(&fns, variant).expect("render converges");
    let v = variant.label();
    let first = &passes[0];
    let last = passes.last().expect("at least one pass");

    common::check_golden(&format!("{v}-pass1.yaml"), &first.output);
    common::check_golden(&format!("{v}-converged.yaml"), &last.output);
    common::check_golden(
        &format!("{v}-observed.yaml"),
        &common::to_yaml_docs(&last.observed).expect("yaml"),
    );
    common::check_golden(&format!("{v}-convergence.yaml"), &summary(&passes));

    // A new XR: what needs nothing from another resource's status comes first.
    let first_names: Vec<&str> = composed(&first.docs)
        .into_iter()
        .filter_map(resource_name)
        .collect();
    for name in [
        "kms-key",
        "kms-alias",
        "audit-key",
        "cluster-role",
        "node-role",
        "gpu-nodegroup",
        "system-nodegroup",
        "keda-release",
    ] {
        assert!(
            first_names.contains(&name),
            "{v}: pass 1 lacks {name}: {first_names:?}"
        );
    }
    for name in [
        "cluster",
        "queue",
        "queue-dlq",
        "queue-redrive",
        "agentplane-release",
        "keda-scaledobject",
    ] {
        assert!(
            !first_names.contains(&name),
            "{v}: pass 1 already has {name}, before its inputs exist"
        );
    }
    assert_eq!(
        xr_ready(&first.docs)["status"],
        "False",
        "{v}: a new XR is not ready"
    );

    // Settled: every resource exists and is ready, so the XR is; status was patched back.
    let docs = &last.docs;
    assert_eq!(
        composed(docs).len(),
        22,
        "{v}: the settled pass composes all 22 resources"
    );
    let ready = xr_ready(docs);
    assert_eq!(
        ready["status"], "True",
        "{v}: settled XR not ready: {ready}"
    );
    assert_eq!(ready["reason"], "Available");
    let status = &docs[0]["status"];
    let fifo = if variant == Variant::V2 { ".fifo" } else { "" };
    let queue_url = format!(
        "https://sqs.eu-west-1.amazonaws.com/111122223333/terraform-20261124000000000000000012{fifo}"
    );
    let dlq_arn =
        format!("arn:aws:sqs:eu-west-1:111122223333:terraform-20261124000000000000000011{fifo}");
    assert_eq!(status["queueUrl"], queue_url.as_str());
    assert_eq!(status["dlqArn"], dlq_arn.as_str());
    assert_eq!(status["kmsKeyArn"], KEY_ARN);
    assert_eq!(status["kmsKeyId"], KEY_ID);
    assert_eq!(status["auditKeyArn"], AUDIT_KEY_ARN);
    assert_eq!(status["clusterEndpoint"], ENDPOINT);
    assert!(
        status["dlqUrl"].is_string()
            && status["queueArn"].is_string()
            && status["clusterName"].is_string()
    );
    // Every status field the pipeline writes is declared by the XRD (the API server would
    // otherwise prune it from the XR).
    let xrd = common::read_yaml(&variant.xrd()).expect("xrd");
    let declared = &xrd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"];
    for key in status
        .as_object()
        .expect("status")
        .keys()
        .filter(|k| *k != "conditions")
    {
        assert!(
            declared.get(key).is_some(),
            "{v}: status.{key} is not declared in the XRD"
        );
    }

    // The key id, observed on the Key, reached both queues through the XR status.
    for q in ["queue", "queue-dlq"] {
        let q = find(docs, q).expect("queue");
        assert_eq!(
            q["spec"]["forProvider"]["kmsMasterKeyId"], KEY_ID,
            "{v}: {q}"
        );
        assert_eq!(
            q["spec"]["forProvider"]["fifoQueue"],
            variant == Variant::V2
        );
    }
    assert_eq!(
        find(docs, "queue").unwrap()["spec"]["forProvider"]["visibilityTimeoutSeconds"],
        600
    );
    assert_eq!(
        find(docs, "queue-dlq").unwrap()["spec"]["forProvider"]["messageRetentionSeconds"],
        1209600
    );
    // The redrive policy names the DLQ and the receive count.
    let redrive = str_at(
        find(docs, "queue-redrive").unwrap(),
        "/spec/forProvider/redrivePolicy",
    );
    let redrive: Value = serde_json::from_str(redrive).expect("the redrive policy is JSON");
    assert_eq!(
        redrive,
        json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5})
    );
    // EKS secrets are encrypted with the key; GPU pool on Spot with the NVIDIA AMI and taint.
    let cluster = find(docs, "cluster").unwrap();
    assert_eq!(
        cluster["spec"]["forProvider"]["encryptionConfig"]["provider"]["keyArn"],
        KEY_ARN
    );
    let ng = &find(docs, "gpu-nodegroup").unwrap()["spec"]["forProvider"];
    assert_eq!(ng["capacityType"], "SPOT");
    assert_eq!(ng["amiType"], "AL2023_x86_64_NVIDIA");
    assert_eq!(
        ng["taint"][0],
        json!({"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"})
    );
    assert_eq!(
        ng["scalingConfig"],
        json!({"minSize": 0, "desiredSize": 1, "maxSize": 4})
    );
    // Add-ons and the control-plane side of the runtime get an untainted On-Demand pool.
    let sys = &find(docs, "system-nodegroup").unwrap()["spec"]["forProvider"];
    assert_eq!(sys["capacityType"], "ON_DEMAND");
    assert_eq!(sys["amiType"], "AL2023_x86_64_STANDARD");
    assert!(
        sys.get("taint").is_none(),
        "{v}: the system pool is tainted"
    );
    assert_eq!(sys["instanceTypes"], json!(["m6i.large"]));
    assert_eq!(
        sys["scalingConfig"],
        json!({"minSize": 2, "desiredSize": 2, "maxSize": 3})
    );
    // The runtime release and the scaler point at the queue.
    let release = &find(docs, "agentplane-release").unwrap()["spec"]["forProvider"];
    assert_eq!(release["values"]["queue"]["url"], queue_url.as_str());
    assert_eq!(release["values"]["kms"]["keyArn"], KEY_ARN);
    assert_eq!(release["values"]["models"]["tiers"][1]["name"], "small");
    assert_eq!(release["chart"]["version"], "0.1.0");
    // The audit log: on in the v2 example (size and class given), off by default for the claim.
    // The signing key is composed either way, and its ARN reaches the values through the status.
    let audit = &release["values"]["operator"]["audit"];
    match variant {
        Variant::V1 => assert_eq!(
            *audit,
            json!({"enabled": false, "kmsKeyArn": AUDIT_KEY_ARN, "storage": {"size": "1Gi"}}),
            "{v}: audit values"
        ),
        Variant::V2 => assert_eq!(
            *audit,
            json!({
                "enabled": true,
                "kmsKeyArn": AUDIT_KEY_ARN,
                "storage": {"size": "5Gi", "storageClassName": "gp3"},
            }),
            "{v}: audit values"
        ),
    }
    // Besides operator.audit, the release values are exactly what they were before spec.audit.
    let mut keys: Vec<&str> = release["values"]
        .as_object()
        .expect("values")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["aws", "kms", "models", "operator", "queue", "worker"],
        "{v}: release value keys"
    );
    assert_eq!(
        release["values"]["operator"].as_object().map(|o| o.len()),
        Some(1),
        "{v}: only operator.audit is set"
    );
    // The signing key: asymmetric P-256 for signing, in the region, tagged, no rotation (KMS
    // does not rotate asymmetric keys), the platform key's deletion window.
    let audit_key = find(docs, "audit-key").expect("audit-key");
    assert_eq!(audit_key["kind"], "Key");
    assert!(
        str_at(audit_key, "/apiVersion").starts_with("kms.aws."),
        "{v}: {}",
        common::describe(audit_key)
    );
    let fp = &audit_key["spec"]["forProvider"];
    assert_eq!(fp["customerMasterKeySpec"], "ECC_NIST_P256", "{v}");
    assert_eq!(fp["keyUsage"], "SIGN_VERIFY", "{v}");
    assert_eq!(fp["enableKeyRotation"], false, "{v}");
    assert!(
        fp.get("rotationPeriodInDays").is_none(),
        "{v}: the signing key has a rotation period"
    );
    assert_eq!(fp["deletionWindowInDays"], 30, "{v}");
    assert_eq!(fp["region"], "eu-west-1", "{v}");
    assert!(
        str_at(fp, "/description").contains("signs agentplane audit checkpoints"),
        "{v}: {fp}"
    );
    assert_eq!(
        fp["tags"]["agentplane.dev/platform"],
        str_at(&first.xr, "/metadata/name"),
        "{v}"
    );
    assert_eq!(
        audit_key["spec"]["providerConfigRef"]["name"], "default",
        "{v}"
    );
    // The platform key stays the symmetric envelope-encryption key.
    let key = &find(docs, "kms-key").unwrap()["spec"]["forProvider"];
    assert_eq!(key["keyUsage"], "ENCRYPT_DECRYPT");
    assert_eq!(key["customerMasterKeySpec"], "SYMMETRIC_DEFAULT");
    let so = &find(docs, "keda-scaledobject").unwrap()["spec"]["forProvider"]["manifest"];
    assert_eq!(so["kind"], "ScaledObject");
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["queueURL"], queue_url.as_str());
    assert_eq!(trigger["metadata"]["queueLength"], "5");
    assert_eq!(trigger["metadata"]["awsRegion"], "eu-west-1");
    assert_eq!(so["spec"]["maxReplicaCount"], 20);

    // Every composed resource is controlled by the XR; v2 keeps them in the XR's namespace.
    let uid = str_at(&first.xr, "/metadata/uid");
    for d in composed(docs) {
        let owner = &d["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], uid, "{v}: {}", common::describe(d));
        assert_eq!(owner["controller"], true);
        match variant {
            Variant::V1 => assert!(
                d["metadata"].get("namespace").is_none(),
                "{}",
                common::describe(d)
            ),
            Variant::V2 => assert_eq!(
                d["metadata"]["namespace"],
                "team-acme",
                "{}",
                common::describe(d)
            ),
        }
        let api_version = str_at(d, "/apiVersion");
        let namespaced_group =
            api_version.contains(".m.upbound.io/") || api_version.contains(".m.crossplane.io/");
        assert_eq!(
            namespaced_group,
            variant == Variant::V2,
            "{v}: {api_version}"
        );
    }
}

#[test]
fn v1_claim_composite_renders_and_converges() {
    run(Variant::V1);
}

#[test]
fn v2_namespaced_xr_renders_and_converges() {
    run(Variant::V2);
}

/// Readiness is computed from the observed resources' Ready conditions: one resource that is
/// not ready keeps the XR Creating and is named in the message; a ProviderConfig, which has no
/// conditions, counts as ready through its `None` readiness check.
#[test]
fn unready_composed_resource_keeps_the_xr_creating() {
    let fns = Functions::start().expect("start the composition functions");
    for variant in [Variant::V1, Variant::V2] {
        let passes = common::converge(&fns, variant).expect("render converges");
        let last = passes.last().unwrap();
        let mut observed = last.observed.clone();
        let ng = observed
            .iter_mut()
            .find(|o| resource_name(o) == Some("gpu-nodegroup"))
            .expect("observed node group");
        ng["status"]["conditions"][0] = json!({
            "type": "Ready", "status": "False", "reason": "Creating",
            "lastTransitionTime": "2026-11-24T00:00:00Z"
        });
        let out = common::render(&fns, variant, &last.xr, &observed).expect("render");
        let docs = common::yaml_docs(&out).expect("yaml");
        let ready = xr_ready(&docs);
        assert_eq!(ready["status"], "False", "{variant:?}: {ready}");
        assert_eq!(ready["reason"], "Creating");
        assert_eq!(
            ready["message"], "Unready resources: gpu-nodegroup",
            "{variant:?}"
        );
        // Status still flows back from the resources that are there.
        assert_eq!(docs[0]["status"]["kmsKeyArn"], KEY_ARN);
    }
}
