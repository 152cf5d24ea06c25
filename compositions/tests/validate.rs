//! Every rendered resource, and every file Crossplane itself reads (XRDs, Compositions, the
//! functions' input, Functions, activation policies), validated by a real kube-apiserver with the
//! upstream CRDs from `$AGENTPLANE_CRDS` installed: server-side dry-run creates, zero errors.

mod common;

use std::path::PathBuf;

use common::{CrdIndex, Functions, Variant, composed, crds_dir, describe, dry_run_create};
use serde_json::{Value, json};

/// The upstream CRDs the rendered resources and the package files are checked against.
fn upstream_crd_files(crossplane: &str) -> Vec<PathBuf> {
    let dir = crds_dir();
    let mut files = Vec::new();
    for sub in ["provider-aws", "provider-helm", "provider-kubernetes"] {
        let mut fs: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
            .unwrap_or_else(|e| panic!("{}/{sub}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        fs.sort();
        files.extend(fs);
    }
    for f in [
        "keda/keda.sh_scaledobjects.yaml",
        "keda/keda.sh_triggerauthentications.yaml",
        "function-patch-and-transform/pt.fn.crossplane.io_resources.yaml",
    ] {
        files.push(dir.join(f));
    }
    let mut core = vec![
        "apiextensions.crossplane.io_compositeresourcedefinitions.yaml",
        "apiextensions.crossplane.io_compositions.yaml",
        "pkg.crossplane.io_functions.yaml",
    ];
    if crossplane == "crossplane-v2.2" {
        core.push("apiextensions.crossplane.io_managedresourceactivationpolicies.yaml");
    }
    for f in core {
        files.push(dir.join(crossplane).join(f));
    }
    for f in &files {
        assert!(f.is_file(), "upstream CRD {} is missing", f.display());
    }
    files
}

/// Dry-run creates `objs`, returning one line per rejection.
async fn dry_run_all(
    client: &kube::Client,
    index: &CrdIndex,
    objs: &[Value],
    default_ns: &str,
) -> Vec<String> {
    let mut errors = Vec::new();
    for o in objs {
        if let Err(e) = dry_run_create(client, index, o, default_ns).await {
            errors.push(format!("{}: {e}", describe(o)));
        }
    }
    errors
}

/// The rendered composed resources of every pass of both variants, plus the KEDA objects
/// embedded in the provider-kubernetes Objects (their manifests are opaque to the Object CRD).
#[tokio::test]
async fn rendered_resources_pass_the_upstream_crd_schemas() {
    let stack = agentplane_testsupport::Stack::shared().expect("the local stack");
    let client = stack.kube_client().await.expect("kube client");
    let index = common::install_crds(&client, &upstream_crd_files("crossplane-v2.2"))
        .await
        .expect("install the upstream CRDs");
    for ns in ["team-acme", "agentplane"] {
        common::ensure_namespace(&client, ns)
            .await
            .expect("namespace");
    }

    let fns = Functions::start().expect("start the composition functions");
    let mut checked = 0;
    let mut errors = Vec::new();
    for variant in [Variant::V1, Variant::V2] {
        let passes = common::converge(&fns, variant).expect("render converges");
        for (i, pass) in passes.iter().enumerate() {
            let mut objs: Vec<Value> = composed(&pass.docs).into_iter().cloned().collect();
            let manifests: Vec<Value> = objs
                .iter()
                .filter(|o| o["kind"] == "Object")
                .map(|o| o["spec"]["forProvider"]["manifest"].clone())
                .collect();
            objs.extend(manifests);
            checked += objs.len();
            for e in dry_run_all(&client, &index, &objs, "default").await {
                errors.push(format!("{} pass {}: {e}", variant.label(), i + 1));
            }
        }
        // The settled pass holds all 22 composed resources and both KEDA manifests.
        let last = &passes.last().unwrap().docs;
        assert_eq!(composed(last).len(), 22);
        // The v2 example turns the audit log on, so an audit-enabled release (and the signing
        // key, composed for both) is among what the API server checked.
        let audit = &common::find(last, "agentplane-release").expect("release")["spec"]["forProvider"]
            ["values"]["operator"]["audit"];
        assert_eq!(audit["enabled"], variant == Variant::V2, "{audit}");
        assert!(audit["kmsKeyArn"].is_string(), "{audit}");
        let key = &common::find(last, "audit-key").expect("audit-key")["spec"]["forProvider"];
        assert_eq!(key["keyUsage"], "SIGN_VERIFY");
        assert_eq!(key["customerMasterKeySpec"], "ECC_NIST_P256");
    }
    assert!(
        errors.is_empty(),
        "{} of {checked} rendered resources rejected:\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(checked > 150, "only {checked} resources checked");

    // Negative controls: the same check rejects a misspelled field, a CEL-required field left
    // out, a wrongly typed field inside an embedded KEDA manifest, and the key spec under the
    // name of the KMS API (`KeySpec`), which the upjet Key calls `customerMasterKeySpec`.
    let passes = common::converge(&fns, Variant::V2).expect("render converges");
    let docs = &passes.last().unwrap().docs;
    let mut queue = common::find(docs, "queue").unwrap().clone();
    queue["spec"]["forProvider"]["visibilityTimeout"] = json!(30);
    let mut nodegroup = common::find(docs, "gpu-nodegroup").unwrap().clone();
    nodegroup["spec"]["forProvider"]
        .as_object_mut()
        .unwrap()
        .remove("scalingConfig");
    let mut scaled =
        common::find(docs, "keda-scaledobject").unwrap()["spec"]["forProvider"]["manifest"].clone();
    scaled["spec"]["minReplicaCount"] = json!("zero");
    let mut audit_key = common::find(docs, "audit-key").unwrap().clone();
    audit_key["spec"]["forProvider"]["keySpec"] = json!("ECC_NIST_P256");
    for (obj, expect) in [
        (
            &queue,
            ".spec.forProvider.visibilityTimeout: field not declared in schema",
        ),
        (
            &nodegroup,
            "spec.forProvider.scalingConfig is a required parameter",
        ),
        (&scaled, "spec.minReplicaCount"),
        (
            &audit_key,
            ".spec.forProvider.keySpec: field not declared in schema",
        ),
    ] {
        let err = dry_run_create(&client, &index, obj, "default")
            .await
            .expect_err(expect);
        assert!(
            err.contains(expect),
            "{}: expected {expect:?} in: {err}",
            describe(obj)
        );
    }
}

/// The patch-and-transform input of a composition as the `Resources` object its CRD describes.
fn pt_input(composition: &Value, name: &str) -> Value {
    let step = composition["spec"]["pipeline"]
        .as_array()
        .and_then(|p| {
            p.iter()
                .find(|s| s["functionRef"]["name"] == "function-patch-and-transform")
        })
        .expect("a patch-and-transform step");
    let mut input = step["input"].clone();
    input["metadata"] = json!({"name": name});
    input
}

fn comp_file(rel: &str) -> Value {
    common::read_yaml(&common::comp_dir().join(rel)).expect("yaml")
}

/// The package files against Crossplane 2.2's own CRDs (and the function's input CRD), and the
/// activation policy covers every managed resource kind a composition uses.
#[tokio::test]
async fn package_files_pass_the_crossplane_2_2_schemas() {
    let stack = agentplane_testsupport::Stack::shared().expect("the local stack");
    let client = stack.kube_client().await.expect("kube client");
    let index = common::install_crds(&client, &upstream_crd_files("crossplane-v2.2"))
        .await
        .expect("install the upstream CRDs");

    let v1c = comp_file("v1/composition.yaml");
    let v2c = comp_file("v2/composition.yaml");
    let mut objs = vec![
        comp_file("v1/xrd.yaml"),
        comp_file("v2/xrd.yaml"),
        v1c.clone(),
        v2c.clone(),
        comp_file("v1/mrap.yaml"),
        comp_file("v2/mrap.yaml"),
        pt_input(&v1c, "v1-input"),
        pt_input(&v2c, "v2-input"),
    ];
    objs.extend(
        common::read_yaml_docs(&common::comp_dir().join("functions.yaml")).expect("functions"),
    );
    let errors = dry_run_all(&client, &index, &objs, "default").await;
    assert!(
        errors.is_empty(),
        "rejected by the Crossplane 2.2 schemas:\n{}",
        errors.join("\n")
    );

    // Each managed resource kind a composition composes is activated by its policy.
    for (comp, mrap) in [(&v1c, "v1/mrap.yaml"), (&v2c, "v2/mrap.yaml")] {
        let activated: Vec<String> = comp_file(mrap)["spec"]["activate"]
            .as_array()
            .expect("activate")
            .iter()
            .map(|v| v.as_str().expect("string").to_owned())
            .collect();
        let input = pt_input(comp, "x");
        for r in input["resources"].as_array().expect("resources") {
            let base = &r["base"];
            if base["kind"] == "ProviderConfig" {
                continue; // Not a managed resource.
            }
            let api_version = base["apiVersion"].as_str().expect("apiVersion");
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            let kind = base["kind"].as_str().expect("kind");
            let plural = index.plural(group, kind).expect("kind installed");
            let crd_name = format!("{plural}.{group}");
            assert!(
                activated.contains(&crd_name),
                "{mrap} does not activate {crd_name} ({})",
                r["name"]
            );
        }
    }
}

/// Crossplane 1.20 (claims): the v1 XRD, the v1 Composition and the Functions against its CRDs,
/// in a stack of their own (1.20 and 2.2 define the same CRD names).
#[tokio::test]
async fn v1_package_files_pass_the_crossplane_1_20_schemas() {
    let stack = agentplane_testsupport::Stack::start().expect("a second local stack");
    let client = stack.kube_client().await.expect("kube client");
    let index = common::install_crds(&client, &upstream_crd_files("crossplane-v1.20"))
        .await
        .expect("install the upstream CRDs");
    let v1c = comp_file("v1/composition.yaml");
    let mut objs = vec![
        comp_file("v1/xrd.yaml"),
        v1c.clone(),
        pt_input(&v1c, "v1-input"),
    ];
    objs.extend(
        common::read_yaml_docs(&common::comp_dir().join("functions.yaml")).expect("functions"),
    );
    let errors = dry_run_all(&client, &index, &objs, "default").await;
    assert!(
        errors.is_empty(),
        "rejected by the Crossplane 1.20 schemas:\n{}",
        errors.join("\n")
    );
    stack.stop().expect("stop the second stack");
}
