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
use agentplane_api::task::{Approval, ApprovalDecision};
use agentplane_testsupport::{peer_command, repo_root};
use cluster::{APPROVER, APPROVER_TOKEN, Cluster, JOIN_TOKEN};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

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

/// Server-side applies the chart's Roles and RoleBindings, returning each component's
/// ServiceAccount (from its RoleBinding's subject).
async fn apply_rbac(client: &kube::Client, objs: &[Value]) -> Vec<(String, String)> {
    let mut accounts = Vec::new();
    for o in objs {
        let kind = o["kind"].as_str().unwrap_or_default();
        if kind != "Role" && kind != "RoleBinding" {
            continue;
        }
        let gvk = GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", kind);
        let ns = o["metadata"]["namespace"].as_str().expect("namespaced");
        let name = o["metadata"]["name"].as_str().expect("named");
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk));
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
    let objs = rendered_chart(&c.namespace);
    let accounts = apply_rbac(&c.client, &objs).await;
    let sa = |component: &str| {
        accounts
            .iter()
            .find(|(c, _)| c == component)
            .unwrap_or_else(|| panic!("no RoleBinding for {component}: {accounts:?}"))
            .1
            .clone()
    };
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
