//! Approvers' decisions as `AgentApproval` objects, against the real kube-apiserver (RBAC
//! authorization on, `ci/stack.sh`): the chart's rendered Roles are applied and asked with
//! SubjectAccessReview who may record a decision, and the distributed runtime (gateway, operator
//! and worker processes) shows that only a decision by a policy approver, recorded through its own
//! object, moves a task.

mod cluster;

use std::process::Command;
use std::time::Duration;

use agentplane::client::DeviceIdentity;
use agentplane::store::TaskStore;
use agentplane_api::TaskPhase;
use agentplane_api::approval::{AgentApproval, AgentApprovalSpec, TASK_LABEL, TaskRef};
use agentplane_api::task::{AgentTask, Approval, ApprovalDecision};
use agentplane_testsupport::{peer_command, repo_root};
use cluster::{APPROVER, APPROVER_TOKEN, Cluster, JOIN_TOKEN};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

const RELEASE: &str = "agentplane";

/// `helm template` of the chart with its defaults into `namespace`.
fn rendered_chart(namespace: &str) -> Vec<Value> {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = peer_command("helm").unwrap_or_else(|e| panic!("{e}"));
    cmd.env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .current_dir(repo_root())
        .args(["template", RELEASE])
        .arg(repo_root().join("charts/agentplane"))
        .args(["--namespace", namespace]);
    let out = run(cmd);
    serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn run(mut cmd: Command) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Server-side applies the chart's Roles and RoleBindings and its admission policy guarding
/// `status.approval`, returning each component's ServiceAccount (from its RoleBinding's subject).
async fn apply_rbac(client: &kube::Client, objs: &[Value]) -> Vec<(String, String)> {
    let mut accounts = Vec::new();
    for o in objs {
        let kind = o["kind"].as_str().unwrap_or_default();
        let group = match kind {
            "Role" | "RoleBinding" => "rbac.authorization.k8s.io",
            "ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding" => {
                "admissionregistration.k8s.io"
            }
            _ => continue,
        };
        let gvk = GroupVersionKind::gvk(group, "v1", kind);
        let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = o["metadata"]["name"].as_str().expect("named");
        let ar = ApiResource::from_gvk(&gvk);
        let api: Api<DynamicObject> = if ns.is_empty() {
            Api::all_with(client.clone(), &ar)
        } else {
            Api::namespaced_with(client.clone(), ns, &ar)
        };
        api.patch(
            name,
            &PatchParams::apply("agentplane-approvals-test").force(),
            &Patch::Apply(o),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {kind} {ns}/{name}: {e}"));
        if kind == "RoleBinding" && !name.ends_with("leader-election") {
            let component = name.trim_start_matches(&format!("{RELEASE}-")).to_owned();
            let sa = o["subjects"][0]["name"].as_str().unwrap().to_owned();
            accounts.push((component, sa));
        }
    }
    accounts
}

/// Renders the chart into the cluster's namespace and applies its RBAC and admission policy.
async fn apply_chart(c: &Cluster) -> Vec<(String, String)> {
    apply_rbac(&c.client, &rendered_chart(&c.namespace)).await
}

/// The ServiceAccount of `component` among the chart's RoleBindings.
fn account(accounts: &[(String, String)], component: &str) -> String {
    accounts
        .iter()
        .find(|(c, _)| c == component)
        .unwrap_or_else(|| panic!("no RoleBinding for {component}: {accounts:?}"))
        .1
        .clone()
}

/// Whether ServiceAccount `sa` of `ns` may `verb` the `resource` (and `subresource`) of
/// agentplane.dev in `ns`, as the API server's RBAC authorizer answers.
async fn allowed(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    verb: &str,
    resource: &str,
    subresource: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        metadata: ObjectMeta::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{ns}:{sa}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.to_owned()),
                group: Some("agentplane.dev".into()),
                resource: Some(resource.to_owned()),
                subresource: subresource.map(str::to_owned),
                verb: Some(verb.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.expect("a review answers").allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gateway_records_decisions_and_the_operator_writes_status() {
    let c = Cluster::new("approvals-rbac").await;
    let accounts = apply_chart(&c).await;
    let sa = |component: &str| account(&accounts, component);
    let (operator, worker, gateway) = (sa("operator"), sa("worker"), sa("gateway"));
    let ns = c.namespace.as_str();
    let can =
        |sa: String, verb: &'static str, resource: &'static str, sub: Option<&'static str>| {
            let client = c.client.clone();
            async move { allowed(&client, ns, &sa, verb, resource, sub).await }
        };

    // Workers decide nothing: no verb at all on AgentApprovals.
    for verb in ["create", "update", "patch", "delete", "get", "list"] {
        assert!(
            !can(worker.clone(), verb, "agentapprovals", None).await,
            "worker may {verb} agentapprovals"
        );
    }
    // The gateway records decisions, and cannot change or remove one once recorded.
    assert!(can(gateway.clone(), "create", "agentapprovals", None).await);
    for verb in ["update", "patch", "delete", "get", "list", "watch"] {
        assert!(
            !can(gateway.clone(), verb, "agentapprovals", None).await,
            "gateway may {verb} agentapprovals"
        );
    }
    // The operator reads and watches them, and writes task status (where the accepted decision is
    // recorded); it does not make decisions up.
    for verb in ["get", "list", "watch"] {
        assert!(can(operator.clone(), verb, "agentapprovals", None).await);
    }
    for verb in ["create", "update", "patch"] {
        assert!(!can(operator.clone(), verb, "agentapprovals", None).await);
    }
    assert!(can(operator.clone(), "patch", "agenttasks", Some("status")).await);
    // The plan journal: workers begin and finish steps and never delete one; the gateway and the
    // operator have no verb on them.
    for verb in ["create", "get", "list", "update"] {
        assert!(
            can(worker.clone(), verb, "agenttasksteps", None).await,
            "worker may not {verb} agenttasksteps"
        );
    }
    assert!(!can(worker.clone(), "delete", "agenttasksteps", None).await);
    for who in [gateway.clone(), operator.clone()] {
        for verb in ["create", "update", "patch", "delete", "get"] {
            assert!(
                !can(who.clone(), verb, "agenttasksteps", None).await,
                "{who} may {verb} agenttasksteps"
            );
        }
    }
    // A control: the authorizer does say no to a ServiceAccount no Role names.
    assert!(!can("nobody".into(), "patch", "agenttasks", Some("status")).await);

    // Recorded decisions are immutable, whoever holds update rights.
    let api: Api<AgentApproval> = Api::namespaced(c.client.clone(), ns);
    let created = api
        .create(&PostParams::default(), &decision("t-immutable", "alice"))
        .await
        .unwrap();
    let mut changed = created.clone();
    changed.spec.approval.decision = ApprovalDecision::Denied;
    let err = api
        .replace(
            &created.metadata.name.clone().unwrap(),
            &PostParams::default(),
            &changed,
        )
        .await
        .expect_err("an AgentApproval cannot be edited");
    assert!(err.to_string().contains("immutable"), "{err}");
}

/// A client that acts as ServiceAccount `sa` of `ns` (the admin impersonating it), so requests meet
/// the API server's RBAC and admission exactly as that component's would.
async fn client_as(c: &Cluster, sa: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(c.stack.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{}:{sa}", c.namespace));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{}", c.namespace),
        "system:authenticated".into(),
    ]);
    kube::Client::try_from(config).unwrap()
}

/// Patches the task's status (a merge patch of `status`) as `client`, optionally as a dry run.
async fn patch_status(
    client: &kube::Client,
    ns: &str,
    task: &str,
    status: Value,
    dry_run: bool,
) -> Result<(), kube::Error> {
    let api: Api<AgentTask> = Api::namespaced(client.clone(), ns);
    let params = PatchParams {
        dry_run,
        ..PatchParams::default()
    };
    api.patch_status(task, &params, &Patch::Merge(&json!({ "status": status })))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_changes_status_approval() {
    let c = Cluster::new("approvals-guard").await;
    let accounts = apply_chart(&c).await;
    let sa = |component: &str| account(&accounts, component);
    let ns = c.namespace.as_str();
    let (worker, gateway, operator) = (
        client_as(&c, &sa("worker")).await,
        client_as(&c, &sa("gateway")).await,
        client_as(&c, &sa("operator")).await,
    );
    let d = c.device("kiosk-guard").await;
    let task = c.admit(&d, &d.intent(1, "purchase", "one coffee")).await;
    let approval = serde_json::to_value(decision(&task, APPROVER).spec.approval).unwrap();

    // The policy takes effect a moment after it is created: probe with dry runs until it refuses.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while patch_status(&worker, ns, &task, json!({ "approval": approval }), true)
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the approval guard never took effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Workers and the gateway may write task status, but not an approval into it.
    for (who, client) in [("worker", &worker), ("gateway", &gateway)] {
        let err = patch_status(client, ns, &task, json!({ "approval": approval }), false)
            .await
            .expect_err(who);
        assert!(
            err.to_string()
                .contains("record a decision as an AgentApproval"),
            "{who}: {err}"
        );
    }
    patch_status(
        &worker,
        ns,
        &task,
        json!({ "reason": "a worker's note" }),
        false,
    )
    .await
    .expect("a worker's status write that leaves the approval alone");
    // The operator records the accepted decision; after that nobody else may change or drop it.
    patch_status(&operator, ns, &task, json!({ "approval": approval }), false)
        .await
        .expect("the operator writes status.approval");
    for change in [
        json!({ "approval": null }),
        json!({ "approval": { "approver": "mallory" } }),
    ] {
        let err = patch_status(&worker, ns, &task, change.clone(), false)
            .await
            .expect_err("a worker changing the accepted approval");
        assert!(err.to_string().contains("AgentApproval"), "{change}: {err}");
    }
    let t = c.store.get_task(&task).await.unwrap().unwrap();
    assert_eq!(t.status.approval.unwrap().approver, APPROVER);
    assert_eq!(t.status.reason.as_deref(), Some("a worker's note"));
}

fn decision(task: &str, approver: &str) -> AgentApproval {
    AgentApproval {
        metadata: ObjectMeta {
            generate_name: Some(format!("{task}-")),
            labels: Some([(TASK_LABEL.to_owned(), task.to_owned())].into()),
            ..Default::default()
        },
        spec: AgentApprovalSpec {
            task_ref: TaskRef {
                name: task.to_owned(),
            },
            approval: Approval {
                decision: ApprovalDecision::Approved,
                approver: approver.to_owned(),
                decided_at: Time(jiff::Timestamp::now()),
                comment: None,
                step: None,
                args_digest: None,
            },
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_move_tasks_only_through_their_own_objects() {
    let mut c = Cluster::new("approvals").await;
    let gw = c.start_gateway().await;
    let _operator = c.operator("op-a");
    let _worker = c.worker("worker-a");
    let d = DeviceIdentity::generate("kiosk-1").unwrap();
    gw.enroll(JOIN_TOKEN, &d, "owner").await.unwrap();
    let approvals: Api<AgentApproval> = Api::namespaced(c.client.clone(), &c.namespace);
    let waiting = |seq| {
        let (gw, d) = (&gw, &d);
        async move {
            let t = gw
                .submit(&d.sign(&d.intent(seq, "purchase", "one coffee")).unwrap())
                .await
                .unwrap();
            t.task_id
        }
    };

    // An approval put into the task's status (as a worker, which may write status, could): it is
    // not a decision, and the task keeps waiting.
    let forged = waiting(1).await;
    let parked = c
        .wait_phase(
            &forged,
            |p| p == TaskPhase::AwaitingApproval,
            Duration::from_secs(60),
        )
        .await;
    let mut status = parked.status.clone();
    status.approval = Some(decision(&forged, APPROVER).spec.approval);
    c.store
        .update_task_status(&forged, &parked.version, status)
        .await
        .unwrap();
    // A decision recorded around the gateway by someone not in the policy's approvers: refused.
    approvals
        .create(&PostParams::default(), &decision(&forged, "mallory"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let t = c.store.get_task(&forged).await.unwrap().unwrap();
        if let Some(cond) = t.status.conditions.iter().find(|c| c.type_ == "Approved") {
            break (
                t.phase(),
                cond.status.clone(),
                cond.reason.clone(),
                cond.message.clone(),
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator never judged mallory's decision\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (refused.0, refused.1.as_str(), refused.2.as_str()),
        (TaskPhase::AwaitingApproval, "False", "NotAnApprover")
    );
    assert!(refused.3.contains("mallory"), "{}", refused.3);

    // Denied through the gateway: the decision is an AgentApproval of its own, and the operator
    // copies it into status as it denies the task.
    let decided = gw
        .decide(APPROVER_TOKEN, &forged, false, Some("not today"))
        .await
        .unwrap();
    assert_eq!(decided.approval.unwrap().decision, ApprovalDecision::Denied);
    let t = c.wait_terminal(&forged).await;
    assert_eq!(t.phase(), TaskPhase::Denied);
    assert_eq!(
        t.status.reason.as_deref(),
        Some(format!("denied by approver {APPROVER}").as_str())
    );
    let accepted = t.status.approval.unwrap();
    assert_eq!(
        (accepted.approver.as_str(), accepted.comment.as_deref()),
        (APPROVER, Some("not today"))
    );
    let recorded = approvals
        .list(&ListParams::default().labels(&format!("{TASK_LABEL}={forged}")))
        .await
        .unwrap();
    let mut by: Vec<_> = recorded
        .items
        .iter()
        .map(|a| a.spec.approval.approver.as_str())
        .collect();
    by.sort();
    assert_eq!(by, ["alice", "mallory"]);

    // Approved through the gateway: runs to the end.
    let ok = waiting(2).await;
    c.wait_phase(
        &ok,
        |p| p == TaskPhase::AwaitingApproval,
        Duration::from_secs(60),
    )
    .await;
    gw.decide(APPROVER_TOKEN, &ok, true, None).await.unwrap();
    let t = c.wait_terminal(&ok).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    assert_eq!(t.status.approval.unwrap().approver, APPROVER);
}
