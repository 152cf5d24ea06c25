//! The Helm chart `charts/agentplane`, checked with the real Helm CLI (built by `ci/peers.sh`) and a
//! real kube-apiserver + etcd (`ci/stack.sh`): `helm lint` (plain and `--strict`) passes,
//! values.schema.json rejects bad values, `helm template` renders with the defaults, with the
//! values the Crossplane v1 composition passes and with the operator's audit log on (a
//! StatefulSet in place of the Deployment), and every rendered object passes a server-side
//! dry-run apply with strict field validation against the chart's CRDs and KEDA's CRDs.
//!
//! A missing peer fails these tests with the reason; nothing is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agentplane_testsupport::{Stack, peer_command, repo_root};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};
use serde_json::{Value, json};

const RELEASE: &str = "agentplane";
const FIELD_MANAGER: &str = "agentplane-chart-test";

fn chart_dir() -> PathBuf {
    repo_root().join("charts/agentplane")
}

/// The Helm peer, with its config/cache/data directories in `home` so a developer's own Helm
/// repositories and plugins never influence the result.
fn helm(home: &Path) -> Command {
    isolated(peer_command("helm").unwrap_or_else(|e| panic!("{e}")), home)
}

/// Helm with the stack's environment (KUBECONFIG), for commands that talk to kube-apiserver.
fn helm_in(stack: &Stack, home: &Path) -> Command {
    isolated(
        stack.command("helm").unwrap_or_else(|e| panic!("{e}")),
        home,
    )
}

fn isolated(mut cmd: Command, home: &Path) -> Command {
    cmd.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(repo_root());
    cmd
}

fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` with the given values files and `--set` flags; panics with Helm's output on failure.
fn template(home: &Path, namespace: &str, values: &[&Path], sets: &[&str]) -> Vec<Value> {
    let mut cmd = helm(home);
    cmd.args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    for v in values {
        cmd.arg("--values").arg(v);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = run(cmd);
    assert!(out.status.success(), "helm template failed: {}", text(&out));
    parse_stream(&String::from_utf8_lossy(&out.stdout))
}

/// Every non-empty document of a multi-document YAML stream.
fn parse_stream(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}"));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_name(o: &Value) -> (String, String) {
    (
        o["kind"].as_str().unwrap_or_default().to_owned(),
        o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| kind_name(o) == (kind.to_owned(), name.to_owned()))
        .unwrap_or_else(|| {
            let all: Vec<_> = objs.iter().map(kind_name).collect();
            panic!("no {kind} {name} rendered; rendered: {all:?}")
        })
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

/// The container's environment as name -> literal value (`valueFrom` entries map to "<from>").
fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = match &e["value"] {
                Value::String(s) => s.clone(),
                Value::Null => "<from>".to_owned(),
                other => panic!("env {name} is not a string: {other}"),
            };
            (name, value)
        })
        .collect()
}

fn only_container(deploy: &Value) -> &Value {
    let containers = deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container per component");
    &containers[0]
}

/// Every object that runs pods: the Deployments, and the operator's StatefulSet when it keeps
/// an audit log.
fn workloads(objs: &[Value]) -> Vec<&Value> {
    let mut w = of_kind(objs, "Deployment");
    w.extend(of_kind(objs, "StatefulSet"));
    w
}

/// The operator: a Deployment, or a StatefulSet with the audit log on, never both.
fn operator_workload(objs: &[Value]) -> &Value {
    let found: Vec<&Value> = workloads(objs)
        .into_iter()
        .filter(|o| o["metadata"]["name"] == "agentplane-operator")
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one operator workload: {:?}",
        found.iter().map(|o| kind_name(o)).collect::<Vec<_>>()
    );
    found[0]
}

/// The invariants every rendering must keep: names, args, security, RBAC.
fn check_invariants(objs: &[Value]) {
    // The compositions' ScaledObject targets this exact name.
    let worker = find(objs, "Deployment", "agentplane-worker");
    for (workload, arg) in [(operator_workload(objs), "operator"), (worker, "worker")] {
        assert_eq!(only_container(workload)["args"], json!([arg]));
    }
    if let Some(gw) = objs
        .iter()
        .find(|o| kind_name(o) == ("Deployment".into(), "agentplane-gateway".into()))
    {
        assert_eq!(only_container(gw)["args"], json!(["gateway"]));
    }
    // Each PodDisruptionBudget selects its workload's pods, whatever the workload's kind.
    for pdb in of_kind(objs, "PodDisruptionBudget") {
        let name = pdb["metadata"]["name"].as_str().unwrap_or_default();
        let selected = &pdb["spec"]["selector"]["matchLabels"];
        let workload = workloads(objs)
            .into_iter()
            .find(|w| w["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("PodDisruptionBudget {name} has no workload"));
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selected.as_object().expect("matchLabels") {
            assert_eq!(&labels[k], v, "PodDisruptionBudget {name}: {k}");
        }
    }

    // Pod and container security on every workload.
    let all = workloads(objs);
    assert!(all.len() >= 2);
    for d in all {
        let name = &d["metadata"]["name"];
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        let containers = pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["initContainers"].as_array().into_iter().flatten());
        for c in containers {
            let sc = &c["securityContext"];
            assert_eq!(
                sc["capabilities"]["drop"],
                json!(["ALL"]),
                "{name}: container {} must drop ALL capabilities",
                c["name"]
            );
            assert!(sc["capabilities"]["add"].is_null(), "{name}: adds caps");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["runAsNonRoot"], true, "{name}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
            for probe in ["livenessProbe", "readinessProbe"] {
                assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{name} {probe}");
            }
            let ports: Vec<_> = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| (p["name"].clone(), p["containerPort"].clone()))
                .collect();
            assert!(
                ports.contains(&(json!("metrics"), json!(9090))),
                "{name}: {ports:?}"
            );
        }
    }

    // Least privilege: namespaced RBAC only, no wildcards, Secrets only by name.
    assert!(of_kind(objs, "ClusterRole").is_empty());
    assert!(of_kind(objs, "ClusterRoleBinding").is_empty());
    let roles = of_kind(objs, "Role");
    assert!(roles.len() >= 3, "a Role per component");
    for role in roles {
        let name = &role["metadata"]["name"];
        for rule in role["rules"].as_array().expect("rules") {
            for field in ["verbs", "resources", "apiGroups", "resourceNames"] {
                for item in rule[field].as_array().into_iter().flatten() {
                    let s = item.as_str().expect("RBAC entries are strings");
                    assert!(!s.contains('*'), "{name}: `{s}` in {field} of {rule}");
                }
            }
            let resources = rule["resources"].as_array().expect("resources");
            if resources.contains(&json!("secrets")) {
                assert!(
                    rule["resourceNames"]
                        .as_array()
                        .is_some_and(|n| !n.is_empty()),
                    "{name}: Secrets must be limited to named secrets: {rule}"
                );
            }
            let verbs = rule["verbs"].as_array().expect("verbs");
            for v in [
                "delete",
                "deletecollection",
                "escalate",
                "bind",
                "impersonate",
            ] {
                assert!(!verbs.contains(&json!(v)), "{name}: verb {v} in {rule}");
            }
        }
    }
}

/// The values the v1 composition passes to the chart, taken from its converged render (golden
/// file of compositions/tests/render.rs), so this test follows the composition.
fn composition_values() -> (String, Value) {
    let path = repo_root().join("compositions/tests/golden/v1-converged.yaml");
    let yaml = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let release = parse_stream(&yaml)
        .into_iter()
        .find(|o| {
            o["metadata"]["annotations"]["crossplane.io/composition-resource-name"]
                == "agentplane-release"
        })
        .unwrap_or_else(|| panic!("no agentplane-release in {}", path.display()));
    let fp = &release["spec"]["forProvider"];
    assert_eq!(fp["chart"]["name"], "agentplane");
    let ns = fp["namespace"]
        .as_str()
        .expect("release namespace")
        .to_owned();
    (ns, fp["values"].clone())
}

fn write_values(dir: &Path, name: &str, values: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        serde_yaml::to_string(values).expect("values to YAML"),
    )
    .expect("writing values file");
    path
}

#[test]
fn lint_passes() {
    let home = tempfile::tempdir().unwrap();
    let (_, values) = composition_values();
    let file = write_values(home.path(), "composition.yaml", &values);
    for extra in [vec![], vec!["--strict"]] {
        let mut cmd = helm(home.path());
        cmd.arg("lint").arg(chart_dir()).args(&extra);
        let out = run(cmd);
        assert!(out.status.success(), "helm lint {extra:?}: {}", text(&out));

        let mut cmd = helm(home.path());
        cmd.arg("lint")
            .arg(chart_dir())
            .args(&extra)
            .arg("--values")
            .arg(&file);
        let out = run(cmd);
        assert!(
            out.status.success(),
            "helm lint {extra:?} with the composition's values: {}",
            text(&out)
        );

        for audit in [
            vec!["operator.audit.enabled=true".to_owned()],
            audit_sets_kms(),
        ] {
            let mut cmd = helm(home.path());
            cmd.arg("lint").arg(chart_dir()).args(&extra);
            for s in &audit {
                cmd.args(["--set", s]);
            }
            let out = run(cmd);
            assert!(
                out.status.success(),
                "helm lint {extra:?} with {audit:?}: {}",
                text(&out)
            );
        }
    }
}

#[test]
fn schema_rejects_bad_values() {
    let home = tempfile::tempdir().unwrap();
    // (--set or --set-string flag, the path the schema error must name)
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "queue.maxReceiveCount=-1"],
            "/queue/maxReceiveCount",
        ),
        (
            &["--set-string", "queue.maxReceiveCount=5"],
            "/queue/maxReceiveCount",
        ),
        (&["--set", "queue.fifo=maybe"], "/queue/fifo"),
        (&["--set", "queue.url=sqs-without-scheme"], "/queue/url"),
        (&["--set", "aws.region=Mars"], "/aws/region"),
        (&["--set", "worker.keda.enabled=true"], "/queue/url"),
        (&["--set", "worker.replicas=-2"], "/worker/replicas"),
        (
            &["--set", "gateway.service.type=Ingress"],
            "/gateway/service/type",
        ),
        (&["--set", "models.tiers[0].name=x"], "/models/tiers/0"),
        (&["--set", "quue.url=https://typo"], "quue"),
        (
            &["--set", "operator.audit.storage.size=lots"],
            "/operator/audit/storage/size",
        ),
        (
            &["--set", "operator.audit.enabled=yes"],
            "/operator/audit/enabled",
        ),
        (
            &["--set", "operator.audit.retention=30d"],
            "at '/operator/audit': additional properties 'retention'",
        ),
        (
            &["--set", "operator.audit.storage.storageClassName=Fast_SSD"],
            "/operator/audit/storage/storageClassName",
        ),
        (
            &["--set", "operator.audit.kmsKeyArn=not a key"],
            "/operator/audit/kmsKeyArn",
        ),
    ];
    for (flags, path) in cases {
        for sub in ["lint", "template"] {
            let mut cmd = helm(home.path());
            cmd.arg(sub);
            if sub == "template" {
                cmd.arg(RELEASE);
            }
            cmd.arg(chart_dir()).args(*flags);
            let out = run(cmd);
            let all = text(&out);
            assert!(!out.status.success(), "helm {sub} {flags:?} passed: {all}");
            assert!(
                all.contains(path),
                "helm {sub} {flags:?} failed, but not on {path}: {all}"
            );
        }
    }
}

#[test]
fn renders_defaults() {
    let home = tempfile::tempdir().unwrap();
    let objs = template(home.path(), "agentplane", &[], &[]);
    check_invariants(&objs);

    for kind in ["ScaledObject", "TriggerAuthentication"] {
        assert!(
            of_kind(&objs, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    let worker = find(&objs, "Deployment", "agentplane-worker");
    assert_eq!(worker["spec"]["replicas"], 1);
    let gw = find(&objs, "Service", "agentplane-gateway");
    assert_eq!(gw["spec"]["ports"][0]["targetPort"], "https");
    let gw = only_container(find(&objs, "Deployment", "agentplane-gateway"));
    assert_eq!(env_of(gw)["AGENTPLANE_LISTEN"], "0.0.0.0:8443");
    for component in ["operator", "worker", "gateway"] {
        find(&objs, "ServiceAccount", &format!("agentplane-{component}"));
        find(
            &objs,
            "PodDisruptionBudget",
            &format!("agentplane-{component}"),
        );
        find(&objs, "Service", &format!("agentplane-{component}-metrics"));
        let env = env_of(only_container(find(
            &objs,
            "Deployment",
            &format!("agentplane-{component}"),
        )));
        assert_eq!(env["AGENTPLANE_NAMESPACE"], "agentplane", "{component}");
        assert_eq!(env["AGENTPLANE_LOG_FORMAT"], "json", "{component}");
        assert_eq!(env["AGENTPLANE_METRICS_LISTEN"], "0.0.0.0:9090");
    }
    let lease_role = find(&objs, "Role", "agentplane-operator-leader-election");
    assert_eq!(
        lease_role["rules"][1]["resourceNames"],
        json!(["agentplane-operator"])
    );

    // Turning the gateway off removes all of it.
    let objs = template(home.path(), "agentplane", &[], &["gateway.enabled=false"]);
    check_invariants(&objs);
    assert!(
        !objs.iter().any(|o| o["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .contains("gateway")),
        "gateway objects rendered with gateway.enabled=false"
    );
}

const GPU_SETS: &[&str] = &[
    "gpu.jobs.enabled=true",
    "gpu.jobs.nodeSelector.agentplane\\.dev/pool=gpu",
    "gpu.jobs.activeDeadlineSeconds=1800",
];

/// The GPU Job template the chart rendered, read the way the operator reads it.
fn gpu_template(dir: &Path, objs: &[Value]) -> agentplane::controller::gpu_job::GpuJobTemplate {
    let cm = find(objs, "ConfigMap", "agentplane-gpu-job");
    let path = dir.join("gpu-job.yaml");
    std::fs::write(&path, cm["data"]["gpu-job.yaml"].as_str().unwrap()).unwrap();
    agentplane::controller::gpu_job::GpuJobTemplate::read(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn renders_gpu_jobs() {
    let home = tempfile::tempdir().unwrap();
    let off = template(home.path(), "agentplane", &[], &[]);
    assert!(
        !off.iter()
            .any(|o| o["metadata"]["name"] == "agentplane-gpu-job"),
        "GPU Job template rendered by default"
    );
    let objs = template(home.path(), "agentplane", &[], GPU_SETS);
    check_invariants(&objs);
    let t = gpu_template(home.path(), &objs);
    assert_eq!(t.active_deadline_seconds, Some(1800));
    let job = t.job_for("agentplane", "t-1", "uid", 3);
    let pod = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("agentplane-worker")
    );
    assert_eq!(pod.node_selector.unwrap()["agentplane.dev/pool"], "gpu");
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    let worker = &pod.containers[0];
    assert_eq!(
        worker.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0,
        "3"
    );
    let env: BTreeMap<String, String> = worker
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(env["AGENTPLANE_NAMESPACE"], "agentplane");
    assert!(
        !env.contains_key("AGENTPLANE_QUEUE_URL"),
        "the pod needs no queue"
    );
    let operator = operator_workload(&objs);
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_of(container)["AGENTPLANE_GPU_JOB_TEMPLATE"],
        "/etc/agentplane/gpu/gpu-job.yaml"
    );
    let role = find(&objs, "Role", "agentplane-operator");
    let jobs_rule = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["apiGroups"] == json!(["batch"]))
        .expect("the operator may manage Jobs");
    assert_eq!(
        jobs_rule["verbs"],
        json!(["create", "get", "list", "watch"])
    );
}

#[test]
fn renders_composition_values() {
    let home = tempfile::tempdir().unwrap();
    let (ns, values) = composition_values();
    let file = write_values(home.path(), "composition.yaml", &values);
    let objs = template(home.path(), &ns, &[&file], &[]);
    check_invariants(&objs);

    // worker.keda.enabled=false: the composition owns the ScaledObject.
    assert!(of_kind(&objs, "ScaledObject").is_empty());
    let q = &values["queue"];
    for component in ["operator", "worker"] {
        let deploy = find(&objs, "Deployment", &format!("agentplane-{component}"));
        assert_eq!(deploy["metadata"]["namespace"], ns.as_str());
        let env = env_of(only_container(deploy));
        assert_eq!(env["AGENTPLANE_QUEUE_URL"], q["url"].as_str().unwrap());
        assert_eq!(
            env["AGENTPLANE_DLQ_URL"],
            q["deadLetterUrl"].as_str().unwrap()
        );
        assert_eq!(env["AGENTPLANE_QUEUE_FIFO"], q["fifo"].to_string());
        assert_eq!(
            env["AGENTPLANE_MAX_RECEIVE_COUNT"],
            q["maxReceiveCount"].to_string()
        );
        assert_eq!(
            env["AGENTPLANE_VISIBILITY_TIMEOUT_SECS"],
            q["visibilityTimeoutSeconds"].to_string()
        );
        assert_eq!(env["AWS_REGION"], values["aws"]["region"].as_str().unwrap());
        assert_eq!(
            env["AGENTPLANE_MODEL_TIERS_FILE"],
            "/etc/agentplane/models/tiers.yaml"
        );
    }
    let worker = env_of(only_container(find(
        &objs,
        "Deployment",
        "agentplane-worker",
    )));
    assert_eq!(
        worker["AGENTPLANE_KMS_KEY_ID"],
        values["kms"]["keyArn"].as_str().unwrap()
    );

    // The tier ladder reaches the ConfigMap unchanged.
    let cm = find(&objs, "ConfigMap", "agentplane-models");
    let tiers: Value =
        serde_yaml::from_str(cm["data"]["tiers.yaml"].as_str().expect("tiers.yaml")).unwrap();
    assert_eq!(tiers["tiers"], values["models"]["tiers"]);
}

#[test]
fn renders_keda_scaler() {
    let home = tempfile::tempdir().unwrap();
    let url = "https://sqs.eu-west-1.amazonaws.com/111122223333/agentplane-tasks";
    let objs = template(
        home.path(),
        "agentplane",
        &[],
        &[
            "worker.keda.enabled=true",
            &format!("queue.url={url}"),
            "aws.region=eu-west-1",
            "worker.keda.maxReplicas=20",
            "worker.keda.activationQueueLength=2",
        ],
    );
    check_invariants(&objs);
    let so = find(&objs, "ScaledObject", "agentplane-worker");
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], "agentplane-worker");
    assert_eq!(so["spec"]["maxReplicaCount"], 20);
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "aws-sqs-queue");
    assert_eq!(trigger["authenticationRef"]["name"], "agentplane-sqs");
    assert_eq!(trigger["metadata"]["queueURL"], url);
    assert_eq!(trigger["metadata"]["queueLength"], "5");
    assert_eq!(trigger["metadata"]["activationQueueLength"], "2");
    assert_eq!(trigger["metadata"]["awsRegion"], "eu-west-1");
    let ta = find(&objs, "TriggerAuthentication", "agentplane-sqs");
    assert_eq!(ta["spec"]["podIdentity"]["provider"], "aws");
    // KEDA owns the replica count.
    let worker = find(&objs, "Deployment", "agentplane-worker");
    assert!(worker["spec"]["replicas"].is_null());
}

const AUDIT_DIR: &str = "/var/lib/agentplane/audit";
const AUDIT_KMS_KEY: &str =
    "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

/// `--set` flags turning the audit log on, with a KMS key and a storage class.
fn audit_sets_kms() -> Vec<String> {
    vec![
        "operator.audit.enabled=true".to_owned(),
        format!("operator.audit.kmsKeyArn={AUDIT_KMS_KEY}"),
        "operator.audit.storage.size=5Gi".to_owned(),
        "operator.audit.storage.storageClassName=gp3".to_owned(),
    ]
}

/// What every audit-enabled rendering has: a StatefulSet in place of the Deployment, with the
/// same pod template, a per-replica volume and the log's environment. Returns its env.
fn check_audit_statefulset(
    objs: &[Value],
    without: &[Value],
    watch_ns: &str,
) -> BTreeMap<String, String> {
    check_invariants(objs);
    assert!(
        !objs
            .iter()
            .any(|o| kind_name(o) == ("Deployment".into(), "agentplane-operator".into())),
        "an operator Deployment beside the StatefulSet"
    );
    let sts = find(objs, "StatefulSet", "agentplane-operator");
    let deploy = find(without, "Deployment", "agentplane-operator");
    assert_eq!(sts["metadata"]["labels"], deploy["metadata"]["labels"]);
    assert_eq!(sts["spec"]["selector"], deploy["spec"]["selector"]);
    assert_eq!(sts["spec"]["replicas"], 2);
    assert_eq!(sts["spec"]["serviceName"], "agentplane-operator-metrics");
    find(objs, "Service", "agentplane-operator-metrics");
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"],
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );

    // The pod template is the Deployment's plus the audit mount and environment.
    let mut pod = sts["spec"]["template"].clone();
    let container = &mut pod["spec"]["containers"][0];
    let mounts = container["volumeMounts"].as_array_mut().expect("mounts");
    let audit_mount = mounts.pop().expect("the audit mount is last");
    assert_eq!(
        audit_mount,
        json!({"name": "audit", "mountPath": AUDIT_DIR})
    );
    let env = container["env"].as_array_mut().expect("env");
    env.retain(|e| {
        !e["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("AGENTPLANE_AUDIT_")
    });
    assert_eq!(
        pod, deploy["spec"]["template"],
        "the StatefulSet's pod template drifted from the Deployment's"
    );
    let env = env_of(only_container(sts));
    assert_eq!(
        env["AGENTPLANE_AUDIT_LOG"],
        format!("{AUDIT_DIR}/audit.sqlite")
    );
    // Kubernetes expands $(AGENTPLANE_POD_NAME) only from a variable defined before it.
    let names: Vec<&str> = only_container(sts)["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("AGENTPLANE_POD_NAME") < pos("AGENTPLANE_AUDIT_ORIGIN"));
    assert_eq!(
        only_container(sts)["env"][pos("AGENTPLANE_POD_NAME")]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["AGENTPLANE_AUDIT_ORIGIN"],
        format!("agentplane.dev/audit/{watch_ns}/$(AGENTPLANE_POD_NAME)")
    );
    let claims = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["metadata"]["name"], "audit");
    assert_eq!(claims[0]["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    env
}

#[test]
fn renders_audit_log_as_a_statefulset() {
    let home = tempfile::tempdir().unwrap();
    let without = template(home.path(), "agentplane", &[], &[]);

    // Local Ed25519 key on the volume, the cluster's default StorageClass, 1Gi.
    let objs = template(
        home.path(),
        "agentplane",
        &[],
        &["operator.audit.enabled=true"],
    );
    let env = check_audit_statefulset(&objs, &without, "agentplane");
    assert_eq!(
        env["AGENTPLANE_AUDIT_KEY_FILE"],
        format!("{AUDIT_DIR}/audit.key")
    );
    assert!(!env.contains_key("AGENTPLANE_AUDIT_KMS_KEY_ID"));
    let claim = &find(&objs, "StatefulSet", "agentplane-operator")["spec"]["volumeClaimTemplates"]
        [0]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "1Gi");
    assert!(
        claim.get("storageClassName").is_none(),
        "an empty class must leave the field out (the cluster default): {claim}"
    );
    // Everything else is as without the audit log.
    let others = |objs: &[Value]| -> Vec<Value> {
        objs.iter()
            .filter(|o| {
                o["metadata"]["name"] != "agentplane-operator"
                    || o["kind"] == "ServiceAccount"
                    || o["kind"] == "Role"
                    || o["kind"] == "RoleBinding"
                    || o["kind"] == "PodDisruptionBudget"
            })
            .cloned()
            .collect()
    };
    assert_eq!(others(&objs), others(&without));

    // A KMS key signs instead, on the given class and size, for another watch namespace.
    let sets = audit_sets_kms();
    let mut sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    sets.push("watchNamespace=team-a");
    let without_team = template(home.path(), "agentplane", &[], &["watchNamespace=team-a"]);
    let objs = template(home.path(), "agentplane", &[], &sets);
    let env = check_audit_statefulset(&objs, &without_team, "team-a");
    assert_eq!(env["AGENTPLANE_AUDIT_KMS_KEY_ID"], AUDIT_KMS_KEY);
    assert!(
        !env.contains_key("AGENTPLANE_AUDIT_KEY_FILE"),
        "the operator refuses both signers at once"
    );
    let claim = &find(&objs, "StatefulSet", "agentplane-operator")["spec"]["volumeClaimTemplates"]
        [0]["spec"];
    assert_eq!(claim["resources"]["requests"]["storage"], "5Gi");
    assert_eq!(claim["storageClassName"], "gp3");

    // Turning it off again renders the Deployment alone.
    let objs = template(
        home.path(),
        "agentplane",
        &[],
        &[
            "operator.audit.enabled=false",
            "operator.audit.storage.size=5Gi",
        ],
    );
    assert!(of_kind(&objs, "StatefulSet").is_empty());
    assert_eq!(objs, without);
}

fn crd_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading CRDs from {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no CRDs in {}", dir.display());
    files
}

fn keda_crds_dir() -> PathBuf {
    let base = std::env::var_os("AGENTPLANE_CRDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/crds"));
    base.join("keda")
}

/// Installs every CRD in `files` for real and waits until the API serves all of them.
async fn install_crds(client: &kube::Client, files: &[PathBuf]) {
    let crds: Vec<Value> = files
        .iter()
        .flat_map(|file| parse_stream(&std::fs::read_to_string(file).unwrap()))
        .collect();
    agentplane_testsupport::apply_crds(client, &crds, FIELD_MANAGER)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Dry-run server-side apply of one rendered object with strict field validation.
async fn dry_run_apply(
    client: &kube::Client,
    discovery: &Discovery,
    obj: &Value,
) -> Result<(), String> {
    let (kind, name) = kind_name(obj);
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, &kind);
    let (ar, caps) = discovery
        .resolve_gvk(&gvk)
        .ok_or_else(|| format!("{api_version} {kind} {name}: the API server does not serve it"))?;
    let dynamic: DynamicObject = serde_json::from_value(obj.clone())
        .map_err(|e| format!("{kind} {name}: not an object: {e}"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = obj["metadata"]["namespace"].as_str().ok_or_else(|| {
                format!("{kind} {name}: namespaced but rendered without a namespace")
            })?;
            Api::namespaced_with(client.clone(), ns, &ar)
        }
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let params = PatchParams::apply(FIELD_MANAGER)
        .force()
        .dry_run()
        .validation_strict();
    api.patch(&name, &params, &Patch::Apply(&dynamic))
        .await
        .map(|_| ())
        .map_err(|e| format!("{kind} {name}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_objects_apply_cleanly() {
    let stack = Stack::shared().unwrap_or_else(|e| panic!("{e}"));
    let client = stack.kube_client().await.unwrap_or_else(|e| panic!("{e}"));
    let home = tempfile::tempdir().unwrap();

    let mut crds = crd_files(&chart_dir().join("crds"));
    crds.extend(crd_files(&keda_crds_dir()));
    install_crds(&client, &crds).await;

    let (ns, values) = composition_values();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("creating namespace {ns}: {e}"));

    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("API discovery");

    let file = write_values(home.path(), "composition.yaml", &values);
    let keda_url = "https://sqs.eu-west-1.amazonaws.com/111122223333/agentplane-tasks";
    let keda_sets = [
        "worker.keda.enabled=true".to_owned(),
        format!("queue.url={keda_url}"),
        "aws.region=eu-west-1".to_owned(),
        "aws.endpointUrl=http://127.0.0.1:4566".to_owned(),
        "otel.endpoint=http://otel-collector:4317".to_owned(),
        "worker.secretNames={openai-api-key,anthropic-api-key}".to_owned(),
        "gateway.credentialsSecret=agentplane-gateway-credentials".to_owned(),
        "gateway.service.type=LoadBalancer".to_owned(),
        "worker.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::111122223333:role/worker".to_owned(),
        "worker.nodeSelector.agentplane\\.dev/pool=cpu".to_owned(),
        "worker.tolerations[0].key=nvidia.com/gpu".to_owned(),
        "worker.tolerations[0].operator=Exists".to_owned(),
        "worker.tolerations[0].effect=NoSchedule".to_owned(),
        "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_owned(),
    ];
    let keda_sets: Vec<&str> = keda_sets.iter().map(String::as_str).collect();
    let audit_sets = audit_sets_kms();
    let audit_sets: Vec<&str> = audit_sets.iter().map(String::as_str).collect();
    let renderings: Vec<(&str, Vec<Value>)> = vec![
        ("defaults", template(home.path(), &ns, &[], &[])),
        (
            "composition values",
            template(home.path(), &ns, &[&file], &[]),
        ),
        (
            "KEDA and every option",
            template(home.path(), &ns, &[&file], &keda_sets),
        ),
        ("GPU Jobs", template(home.path(), &ns, &[&file], GPU_SETS)),
        (
            "audit log, local key",
            template(home.path(), &ns, &[&file], &["operator.audit.enabled=true"]),
        ),
        (
            "audit log, KMS key and storage class",
            template(home.path(), &ns, &[&file], &audit_sets),
        ),
        ("GPU Jobs", template(home.path(), &ns, &[&file], GPU_SETS)),
    ];

    let mut errors = Vec::new();
    let mut applied = 0;
    // The Job the operator would make from the rendered GPU template, dry-run applied too: the
    // template's pod must be one kube-apiserver accepts.
    let gpu_objs = &renderings.iter().find(|(l, _)| *l == "GPU Jobs").unwrap().1;
    let job = serde_json::to_value(
        gpu_template(home.path(), gpu_objs).job_for(&ns, "t-1", "0000-uid", 2),
    )
    .unwrap();
    let mut job = job;
    job["apiVersion"] = json!("batch/v1");
    job["kind"] = json!("Job");
    job["metadata"]["ownerReferences"] = json!([]);
    if let Err(e) = dry_run_apply(&client, &discovery, &job).await {
        errors.push(format!("[GPU Job] {e}"));
    }
    for (label, objs) in &renderings {
        check_invariants(objs);
        for obj in objs {
            match dry_run_apply(&client, &discovery, obj).await {
                Ok(()) => applied += 1,
                Err(e) => errors.push(format!("[{label}] {e}")),
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} rendered object(s) rejected by kube-apiserver:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // `helm install --dry-run=server` against the same API server: installs' own checks pass,
    // NOTES.txt renders, and the schema rejects a bad value at install time too.
    let install = |extra: &[&str]| {
        let mut cmd = helm_in(stack, home.path());
        cmd.args(["install", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", &ns, "--dry-run=server"])
            .args(extra);
        run(cmd)
    };
    let values_file = file.to_str().expect("UTF-8 temp path");
    let out = install(&["--values", values_file]);
    assert!(
        out.status.success(),
        "helm install --dry-run=server: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("NOTES:") && stdout.contains("deployment/agentplane-worker"),
        "{stdout}"
    );
    let out = install(&["--set", "queue.maxReceiveCount=0"]);
    assert!(!out.status.success(), "install accepted maxReceiveCount=0");
    assert!(
        text(&out).contains("/queue/maxReceiveCount"),
        "{}",
        text(&out)
    );

    // The check bites: strict validation rejects a field the API does not know.
    let mut bad = find(&renderings[0].1, "Deployment", "agentplane-worker").clone();
    bad["spec"]["template"]["spec"]["containers"][0]["bogusField"] = json!(true);
    let err = dry_run_apply(&client, &discovery, &bad)
        .await
        .expect_err("an unknown field must be rejected");
    assert!(err.contains("bogusField"), "{err}");

    let keda = &renderings[2].1;
    assert!(!of_kind(keda, "ScaledObject").is_empty());
    for (_, audited) in renderings
        .iter()
        .filter(|(l, _)| l.starts_with("audit log"))
    {
        find(audited, "StatefulSet", "agentplane-operator");
    }
    assert!(applied >= 80, "only {applied} objects were dry-run applied");

    // The install names the StatefulSet and says how to verify a replica's log.
    let mut audit_install = vec!["--values", values_file];
    for s in &audit_sets {
        audit_install.extend(["--set", s]);
    }
    let out = install(&audit_install);
    assert!(
        out.status.success(),
        "helm install --dry-run=server with the audit log: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("statefulset/agentplane-operator")
            && stdout.contains("agentplane audit verify"),
        "{stdout}"
    );
}
