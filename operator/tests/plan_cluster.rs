//! Plans in the distributed runtime: the step journal as `AgentTaskStep` objects on a real
//! kube-apiserver + etcd, and the `agentplane operator` and `worker` binaries running a plan over a
//! real MCP server (`ci/mcp/recorder.py` on the Python MCP SDK, which records every call it
//! receives with its idempotency key) against the scripted model (`scripted_model`: no LLM runs
//! here; it speaks the exact OpenAI chat-completions tool-call format). The model's API key is a
//! KMS-sealed Secret (moto KMS), read by the worker as in production.

use std::path::PathBuf;
use std::time::Duration;

mod cluster;
mod mcp_peers;
mod scripted_model;

use agentplane::controller::gpu_job::{after_job_dispatch_id, dispatch_job_name, job_name};
use agentplane::secrets::KubeKmsSecrets;
use agentplane::store::journal::{Begun, JournalEntry, StepEnd, StepJournal};
use agentplane::store::kube_journal::KubeJournal;
use agentplane::store::{TaskRecord, TaskStore};
use agentplane_api::TaskPhase;
use agentplane_api::policy::AgentPolicy;
use agentplane_api::policy::{
    AgentPolicySpec, EndpointKind, McpServer, NamedValue, SecretKeyRef, ToolRule,
};
use agentplane_api::step::{AgentTaskStep, MAX_STEP_TEXT_BYTES, step_object_name};
use agentplane_api::task::{Approval, ApprovalDecision, PendingApproval, StepKind, StepOutcome};
use cluster::{APPROVER, Cluster};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use mcp_peers::{recorded, recorder_server, tool, wait_for_calls};
use scripted_model::{
    ModelServer, Scripted, assert_three_records_once, plan_policy, three_records,
};
use serde_json::json;

const INTENT: &str = "agent";

fn steps_api(c: &Cluster) -> Api<AgentTaskStep> {
    Api::namespaced(c.client.clone(), &c.namespace)
}

/// The recorder's credential: injected as `RECORDER_TOKEN` from a KMS-sealed Secret, so the
/// recorder's log shows it arrived (by its SHA-256) and no component may ever print it.
const MCP_TOKEN: &str = "mcp-token-7f3a9c51e2d84b60";

/// Seals the scripted model's key (Secret `model`) and the recorder's token (Secret `mcp`) into
/// the namespace under a fresh moto KMS key.
async fn seal_secrets(c: &Cluster) {
    let kms = aws_sdk_kms::Client::new(&c.stack.aws_sdk_config().await);
    let key_id = kms
        .create_key()
        .description("agentplane plan_cluster test")
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    let secrets = KubeKmsSecrets::new(c.client.clone(), &c.namespace, kms);
    for (name, key, value) in [
        ("model", "api-key", scripted_model::KEY),
        ("mcp", "token", MCP_TOKEN),
    ] {
        secrets
            .put(
                &key_id,
                &SecretKeyRef {
                    name: name.into(),
                    key: key.into(),
                },
                value.as_bytes(),
            )
            .await
            .unwrap();
    }
}

/// The recorder, with its token from the sealed Secret `mcp`.
fn recorder_with_token(log: &std::path::Path) -> McpServer {
    let mut server = recorder_server(log);
    if let Some(stdio) = server.stdio.as_mut() {
        stdio.env.push(NamedValue {
            name: "RECORDER_TOKEN".into(),
            value: None,
            secret_ref: Some(SecretKeyRef {
                name: "mcp".into(),
                key: "token".into(),
            }),
        });
    }
    server
}

/// A cluster with the plan policy, the sealed model key and a registered device; no components yet.
struct Fixture {
    c: Cluster,
    model: ModelServer,
    log: PathBuf,
    device: agentplane::client::DeviceIdentity,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(name: &str, script: Vec<Scripted>, tools: Vec<ToolRule>) -> Fixture {
        Fixture::with(name, script, tools, |_| {}).await
    }

    /// As [`Fixture::new`], with the policy edited by `edit` before it is stored.
    async fn with(
        name: &str,
        script: Vec<Scripted>,
        tools: Vec<ToolRule>,
        edit: impl FnOnce(&mut AgentPolicySpec),
    ) -> Fixture {
        let c = Cluster::new(name).await;
        let model = ModelServer::start(script).await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.jsonl");
        let mut policy = plan_policy(
            cluster::policy(),
            INTENT,
            EndpointKind::Openai,
            &model.base,
            vec![recorder_with_token(&log)],
            tools,
        );
        edit(&mut policy);
        c.store.put_policy(policy).await.unwrap();
        seal_secrets(&c).await;
        let device = c.device("kiosk-1").await;
        Fixture {
            c,
            model,
            log,
            device,
            _dir: dir,
        }
    }

    async fn submit(&self, seq: u64, prompt: &str) -> String {
        self.c
            .admit(&self.device, &self.device.intent(seq, INTENT, prompt))
            .await
    }

    /// Waits until the model was asked for turn `turn` (0-based): the plan is inside that step.
    async fn wait_asked(&self, turn: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.model.asked_for_turn(turn) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the model was never asked for turn {turn}\n{}",
                self.c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn step_objects(&self, task: &str) -> Vec<AgentTaskStep> {
        let mut items = steps_api(&self.c)
            .list(&ListParams::default().labels(&format!("agentplane.dev/task={task}")))
            .await
            .unwrap()
            .items;
        items.sort_by_key(|s| s.spec.step);
        items
    }
}

/// A write, then the destructive delete (step 4, which needs an approver), then the answer.
fn write_then_delete() -> Vec<Scripted> {
    vec![
        Scripted::Calls(vec![(
            "rec__write_record",
            json!({"key": "a", "value": "1"}),
        )]),
        Scripted::Calls(vec![("rec__delete_record", json!({"key": "a"}))]),
        Scripted::Answer,
    ]
}

fn write_and_delete_tools() -> Vec<ToolRule> {
    vec![
        tool("rec", "write_record", false),
        tool("rec", "delete_record", true),
    ]
}

/// The approver's decision on the waiting call, recorded as the gateway does (an AgentApproval).
async fn approve(c: &Cluster, id: &str, pending: &PendingApproval) {
    c.store
        .record_decision(
            id,
            Approval {
                decision: ApprovalDecision::Approved,
                approver: APPROVER.into(),
                comment: None,
                decided_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::now(),
                ),
                step: Some(pending.step),
                args_digest: Some(pending.args_digest.clone()),
            },
        )
        .await
        .unwrap();
}

/// Waits for the write-then-delete plan to end: Succeeded, with the write and the approved delete
/// each recorded once under its step key.
async fn succeeded_with_write_then_delete_once(f: &Fixture, id: &str) -> TaskRecord {
    let t = f.c.wait_terminal(id).await;
    assert_eq!(
        t.phase(),
        TaskPhase::Succeeded,
        "{:?}\n{}",
        t.status.reason,
        f.c.logs()
    );
    let calls: Vec<(String, String)> = recorded(&f.log)
        .into_iter()
        .map(|c| (c.tool, c.key))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("write_record".to_owned(), format!("{id}/tool/2")),
            ("delete_record".to_owned(), format!("{id}/tool/4")),
        ],
        "each call once, under its step key"
    );
    t
}

fn entry(task: &str, step: u32, kind: StepKind) -> JournalEntry {
    let mut e = JournalEntry::start(task, step, kind, "rec/write_record");
    if kind == StepKind::Tool {
        e.payload = json!({"arguments": {"key": "a"}});
        e.call_id = Some(format!("call_{step}"));
        e.args_digest = Some("sha256:00".into());
    }
    e
}

fn done(result: &str) -> StepEnd {
    StepEnd {
        outcome: StepOutcome::Done,
        payload: None,
        result: Some(result.into()),
        input_tokens: 3,
        output_tokens: 4,
        cost_micros: 5,
        error: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_step_journal_begins_once_finishes_once_and_the_api_server_keeps_finished_steps_final()
 {
    let c = Cluster::new("journal").await;
    let d = c.device("kiosk-1").await;
    let task = c.admit(&d, &d.intent(1, "summarize", "journal me")).await;
    let journal = KubeJournal::new(c.client.clone(), &c.namespace);

    // Begin: once. A second begin reads the first row back, arguments and all.
    assert_eq!(
        journal
            .begin(&entry(&task, 1, StepKind::Tool))
            .await
            .unwrap(),
        Begun::Started
    );
    let Begun::Existing(again) = journal
        .begin(&entry(&task, 1, StepKind::Tool))
        .await
        .unwrap()
    else {
        panic!("a second begin must find the first");
    };
    assert_eq!(again.outcome, StepOutcome::Pending);
    assert_eq!(again.payload, json!({"arguments": {"key": "a"}}));
    assert_eq!(again.call_id.as_deref(), Some("call_1"));

    // Eight attempts racing to begin step 2: the API server lets exactly one create it.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let j = KubeJournal::new(c.client.clone(), &c.namespace);
            let e = entry(&task, 2, StepKind::Model);
            tokio::spawn(async move { j.begin(&e).await.unwrap() })
        })
        .collect();
    let mut started = 0;
    for r in racers {
        if r.await.unwrap() == Begun::Started {
            started += 1;
        }
    }
    assert_eq!(started, 1, "exactly one racer begins the step");

    // Finish: once; a second finish changes nothing.
    assert!(journal.finish(&task, 1, done("stored a")).await.unwrap());
    assert!(!journal.finish(&task, 1, done("other")).await.unwrap());
    // Approval parking and finishing after it.
    journal.await_approval(&task, 2).await.unwrap();
    journal.await_approval(&task, 2).await.unwrap();
    let steps = journal.steps(&task).await.unwrap();
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.step, s.outcome))
            .collect::<Vec<_>>(),
        vec![(1, StepOutcome::Done), (2, StepOutcome::AwaitingApproval)]
    );
    assert_eq!(steps[0].result.as_deref(), Some("stored a"));
    assert_eq!(steps[0].cost_micros, 5);
    assert!(steps[0].finished_at.is_some());
    assert!(journal.finish(&task, 2, done("approved")).await.unwrap());

    // The object is owned by its task, so the garbage collector removes it with the task.
    let api = steps_api(&c);
    let obj = api.get(&step_object_name(&task, 1)).await.unwrap();
    let tasks: Api<agentplane_api::AgentTask> = Api::namespaced(c.client.clone(), &c.namespace);
    let owner = &obj.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentTask", task.as_str())
    );
    assert_eq!(
        Some(&owner.uid),
        tasks.get(&task).await.unwrap().metadata.uid.as_ref()
    );

    // A writer that ignores the journal's rules cannot change a finished step: the CRD's
    // transition rule refuses it at the API server.
    let mut edited = obj.clone();
    edited.spec.result = Some("rewritten".into());
    let err = api
        .replace(
            &edited.metadata.name.clone().unwrap(),
            &PostParams::default(),
            &edited,
        )
        .await
        .expect_err("a finished step is final");
    assert!(
        err.to_string().contains("a finished step never changes"),
        "{err}"
    );
    // Its replay data included: the journaled arguments are what a resume would run.
    let mut edited = obj.clone();
    edited.spec.payload = Some(
        json!({"arguments": {"key": "b"}})
            .as_object()
            .cloned()
            .unwrap(),
    );
    let err = api
        .replace(&step_object_name(&task, 1), &PostParams::default(), &edited)
        .await
        .expect_err("a finished step's payload is final");
    assert!(
        err.to_string().contains("a finished step never changes"),
        "{err}"
    );
    // Nor move a step's identity, even while it is pending.
    journal
        .begin(&entry(&task, 3, StepKind::Tool))
        .await
        .unwrap();
    let mut moved = api.get(&step_object_name(&task, 3)).await.unwrap();
    moved.spec.step = 4;
    let err = api
        .replace(&step_object_name(&task, 3), &PostParams::default(), &moved)
        .await
        .expect_err("a step's identity is fixed");
    assert!(err.to_string().contains("fixed at creation"), "{err}");

    // A step whose texts would not fit one object is refused with the reason, before any write.
    let mut big = entry(&task, 5, StepKind::Tool);
    big.payload = json!({"arguments": {"blob": "x".repeat(MAX_STEP_TEXT_BYTES + 1)}});
    let err = journal
        .begin(&big)
        .await
        .expect_err("too large for one step object");
    assert!(err.to_string().contains("one step object holds"), "{err}");
    assert!(
        api.get_opt(&step_object_name(&task, 5))
            .await
            .unwrap()
            .is_none()
    );

    // Finishing a step never begun is an error naming it, not a silent success.
    let err = journal
        .finish(&task, 9, done("x"))
        .await
        .expect_err("step 9 was never begun");
    assert!(
        err.to_string().contains(&step_object_name(&task, 9)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_on_the_distributed_worker_survives_a_sigkill_after_step_two_and_repeats_no_tool_call()
 {
    let f = Fixture::new(
        "plan-kill",
        three_records(),
        vec![tool("rec", "write_record", false)],
    )
    .await;
    // Hold the model's third turn (step 5): by then step 4's write has happened.
    f.model.state.lock().unwrap().hold = Some(2);
    let _operator = f.c.operator("op-plan");
    let worker = f.c.worker("worker-plan-1");
    let id = f.submit(1, "write three records").await;

    let calls = wait_for_calls(&f.log, 2).await;
    assert_eq!(calls.len(), 2);
    // Wait until the held turn was asked: the worker is inside step 5.
    f.wait_asked(2).await;
    let journaled: Vec<_> = f
        .step_objects(&id)
        .await
        .iter()
        .map(|s| (s.spec.step, s.spec.outcome))
        .collect();
    assert_eq!(
        journaled,
        vec![
            (1, StepOutcome::Done),
            (2, StepOutcome::Done),
            (3, StepOutcome::Done),
            (4, StepOutcome::Done),
            (5, StepOutcome::Pending),
        ],
        "steps 1-4 journaled as done and step 5 begun before the kill"
    );
    worker.kill().await;
    f.model.release.send_replace(true);

    // A fresh worker takes the redelivered message and resumes at step 5.
    let _worker = f.c.worker("worker-plan-2");
    let t = f.c.wait_terminal(&id).await;
    assert_eq!(
        t.phase(),
        TaskPhase::Succeeded,
        "{:?}\n{}",
        t.status.reason,
        f.c.logs()
    );
    assert_three_records_once(&t, &f.log);
    // Steps 1-4 were replayed, not asked again: the model saw turns 0 and 1 once each.
    assert_eq!(f.model.asked_for_turn(0), 1);
    assert_eq!(f.model.asked_for_turn(1), 1);

    // The journal and the status agree: seven steps, all done, with the tool steps' digests.
    let objects = f.step_objects(&id).await;
    assert_eq!(objects.len(), 7);
    assert!(objects.iter().all(|s| s.spec.outcome == StepOutcome::Done));
    let summary: Vec<(u32, StepKind)> = t.status.steps.iter().map(|s| (s.index, s.kind)).collect();
    assert_eq!(
        summary,
        (1..=7)
            .map(|i| (
                i,
                if i % 2 == 0 {
                    StepKind::Tool
                } else {
                    StepKind::Model
                }
            ))
            .collect::<Vec<_>>()
    );
    // Usage counts every model turn: four turns of 10 in / 5 out.
    let usage = t.status.usage.unwrap_or_default();
    assert_eq!((usage.input_tokens, usage.output_tokens), (40, 20));

    // The MCP server's credential came from the KMS-sealed Secret (both workers' sessions got it),
    // and it is nowhere else: not in a component's log, a step object or the task.
    let want = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(MCP_TOKEN.as_bytes()));
    for call in recorded(&f.log) {
        assert_eq!(
            call.token_sha256.as_deref(),
            Some(want.as_str()),
            "{call:?}"
        );
    }
    for entry in std::fs::read_dir(f.c.logs.path()).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !text.contains(MCP_TOKEN),
            "{} holds the MCP token",
            entry.path().display()
        );
    }
    let stored =
        serde_json::to_string(&objects).unwrap() + &serde_json::to_string(&t.status).unwrap();
    assert!(!stored.contains(MCP_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destructive_tool_on_the_distributed_runtime_waits_for_an_approver_and_runs_the_approved_call_once()
 {
    let f = Fixture::new(
        "plan-approve",
        write_then_delete(),
        write_and_delete_tools(),
    )
    .await;
    let _operator = f.c.operator("op-approve");
    let _worker = f.c.worker("worker-approve");
    let id = f.submit(1, "write then delete").await;
    let parked =
        f.c.wait_phase(
            &id,
            |p| p == TaskPhase::AwaitingApproval || p.is_terminal(),
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(
        parked.phase(),
        TaskPhase::AwaitingApproval,
        "{:?}",
        parked.status.reason
    );
    let pending = parked
        .status
        .pending_approval
        .clone()
        .expect("the step that waits");
    assert_eq!(
        (pending.step, pending.server.as_str(), pending.tool.as_str()),
        (4, "rec", "delete_record")
    );
    assert_eq!(
        f.step_objects(&id).await.last().map(|s| s.spec.outcome),
        Some(StepOutcome::AwaitingApproval)
    );
    assert_eq!(recorded(&f.log).len(), 1, "only the write ran so far");

    approve(&f.c, &id, &pending).await;
    succeeded_with_write_then_delete_once(&f, &id).await;
    assert_eq!(
        f.step_objects(&id).await[3].spec.outcome,
        StepOutcome::Done,
        "the approved step is finished in the journal"
    );
}

/// The GPU Job template the operator is given (no kubelet here: the test runs the pod's command).
const GPU_TEMPLATE: &str = r#"
template:
  spec:
    serviceAccountName: agentplane-worker
    containers:
      - name: worker
        image: ghcr.io/agentplane/agentplane:test
ttlSecondsAfterFinished: 900
backoffLimit: 1
"#;

/// The Job controller's part: the Job `name` completed.
async fn complete_job(jobs: &Api<Job>, name: &str) {
    let now = jiff::Timestamp::now().to_string();
    jobs.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "startTime": now, "completionTime": now, "succeeded": 1,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now},
            ],
        }})),
    )
    .await
    .unwrap_or_else(|e| panic!("writing Job {name}'s status: {e}"));
}

async fn wait_for_job(c: &Cluster, jobs: &Api<Job>, name: &str) -> Job {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(j) = jobs.get_opt(name).await.unwrap() {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Job {name} within 60 s\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Job's pod command (`agentplane worker --task NS/NAME`).
fn pod_args(job: &Job) -> Vec<String> {
    job.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap()
}

/// Starts an operator dispatching GPU tasks as Jobs and admits a one-GPU `agent` task.
async fn gpu_task(f: &Fixture, operator: &str, prompt: &str) -> (cluster::Proc, String, Api<Job>) {
    let template = f.c.logs.path().join("gpu-job.yaml");
    std::fs::write(&template, GPU_TEMPLATE).unwrap();
    let op = f.c.operator_with(
        operator,
        &[(
            "AGENTPLANE_GPU_JOB_TEMPLATE",
            template.display().to_string(),
        )],
    );
    let mut payload = f.device.intent(1, INTENT, prompt);
    payload.required_resources.gpu = 1;
    let id = f.c.admit(&f.device, &payload).await;
    let jobs: Api<Job> = Api::namespaced(f.c.client.clone(), &f.c.namespace);
    (op, id, jobs)
}

/// Waits until the task's recorded dispatch is the Job `name`.
async fn wait_dispatched(c: &Cluster, id: &str, name: &str) {
    let want = format!("job/{name}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = c.store.get_task(id).await.unwrap().unwrap();
        let got = t.status.queue.as_ref().and_then(|q| q.message_id.clone());
        if got.as_deref() == Some(want.as_str()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} never dispatched on {name}: {got:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a Job's pod command (`agentplane worker --task NS/NAME`) to its end; returns its stdout.
async fn run_pod(c: &Cluster, job: &Job) -> String {
    let out = c.run_command(&pod_args(job)).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_plan_parked_for_approval_runs_the_approved_rest_on_a_job_of_its_own() {
    let f = Fixture::with(
        "gpu-plan",
        write_then_delete(),
        write_and_delete_tools(),
        |p| p.models[0].gpu = true,
    )
    .await;
    let (_operator, id, jobs) = gpu_task(&f, "op-gpu-plan", "write then delete on the gpu").await;

    // The first Job runs the plan up to the step that needs an approver.
    let first = wait_for_job(&f.c, &jobs, &job_name(&id)).await;
    let out = run_pod(&f.c, &first).await;
    assert!(
        out.contains("waits at a plan step for an approver"),
        "{out}"
    );
    let parked = f.c.store.get_task(&id).await.unwrap().unwrap();
    assert_eq!(
        parked.phase(),
        TaskPhase::AwaitingApproval,
        "{:?}",
        parked.status.reason
    );
    let pending = parked.status.pending_approval.clone().unwrap();
    assert_eq!((pending.step, pending.tool.as_str()), (4, "delete_record"));
    assert_eq!(recorded(&f.log).len(), 1, "only the write ran");
    complete_job(&jobs, &job_name(&id)).await;

    // Approved: the rest runs on a second Job (the first one is Complete), which the operator
    // watches instead of the first.
    approve(&f.c, &id, &pending).await;
    let second_name = dispatch_job_name(&id, Some(&format!("{id}/step/4")));
    assert_ne!(second_name, job_name(&id));
    let second = wait_for_job(&f.c, &jobs, &second_name).await;
    wait_dispatched(&f.c, &id, &second_name).await;
    // The operator does not take the first Job's completion for this dispatch's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        f.c.store.get_task(&id).await.unwrap().unwrap().phase(),
        TaskPhase::Queued
    );
    let out = run_pod(&f.c, &second).await;
    assert!(out.contains("succeeded"), "{out}");
    complete_job(&jobs, &second_name).await;
    let t = succeeded_with_write_then_delete_once(&f, &id).await;
    // The completed second Job leaves the finished task alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        f.c.store.get_task(&id).await.unwrap().unwrap().version,
        t.version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_plan_suspended_mid_plan_frees_its_job_and_resumes_on_a_new_one_when_suspend_is_cleared()
 {
    let f = Fixture::with(
        "gpu-suspend",
        three_records(),
        vec![tool("rec", "write_record", false)],
        |p| p.models[0].gpu = true,
    )
    .await;
    // Hold the model's second turn (step 3): the namespace is suspended while it is in flight.
    f.model.state.lock().unwrap().hold = Some(1);
    let (_operator, id, jobs) = gpu_task(&f, "op-gpu-suspend", "three writes on the gpu").await;
    let first = wait_for_job(&f.c, &jobs, &job_name(&id)).await;
    let pod = f.c.run_command(&pod_args(&first)).spawn().unwrap();
    wait_for_calls(&f.log, 1).await;
    f.wait_asked(1).await;
    let policies: Api<AgentPolicy> = Api::namespaced(f.c.client.clone(), &f.c.namespace);
    let suspend = |on: bool| {
        let policies = policies.clone();
        async move {
            policies
                .patch(
                    "default",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"suspend": on}})),
                )
                .await
                .unwrap();
        }
    };
    suspend(true).await;
    // Give the pod's policy watch a moment to see it, then let step 3 finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.model.release.send_replace(true);
    let out = pod.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("suspended"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let held = f.c.store.get_task(&id).await.unwrap().unwrap();
    assert_eq!(held.phase(), TaskPhase::Queued, "{:?}", held.status.reason);
    assert!(
        held.status
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("suspended before step 4"),
        "{:?}",
        held.status.reason
    );
    assert_eq!(recorded(&f.log).len(), 1, "nothing ran after the suspend");
    // The Job controller's part: the pod exited 0, so the Job is Complete (its GPU is free).
    complete_job(&jobs, &job_name(&id)).await;
    let first_uid = jobs
        .get(&job_name(&id))
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let next = dispatch_job_name(&id, Some(&after_job_dispatch_id(&id, &first_uid)));
    // While suspended: no new Job, the task stays Queued (not failed as an incomplete Job).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(jobs.get_opt(&next).await.unwrap().is_none());
    assert_eq!(
        f.c.store.get_task(&id).await.unwrap().unwrap().phase(),
        TaskPhase::Queued
    );

    // Cleared: the operator sends the task again, on a new Job.
    suspend(false).await;
    let second = wait_for_job(&f.c, &jobs, &next).await;
    wait_dispatched(&f.c, &id, &next).await;

    // Suspended again before that Job's pod runs: it hands the task back without running a step,
    // and the Job is gone (its TTL ran out) by the time suspend is cleared.
    suspend(true).await;
    let out = run_pod(&f.c, &second).await;
    assert!(out.contains("suspended"), "{out}");
    assert_eq!(recorded(&f.log).len(), 1);
    // As the TTL controller deletes it (background propagation: gone at once, no orphan finalizer).
    jobs.delete(&next, &kube::api::DeleteParams::background())
        .await
        .unwrap();
    let gone = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(next.as_bytes()));
    let third_name = dispatch_job_name(&id, Some(&after_job_dispatch_id(&id, &gone)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(jobs.get_opt(&third_name).await.unwrap().is_none());
    assert_eq!(
        f.c.store.get_task(&id).await.unwrap().unwrap().phase(),
        TaskPhase::Queued,
        "a handed-back task whose Job is gone waits while suspended"
    );
    suspend(false).await;
    let third = wait_for_job(&f.c, &jobs, &third_name).await;
    wait_dispatched(&f.c, &id, &third_name).await;

    // That one resumes the plan at step 4.
    let second = third;
    let out = run_pod(&f.c, &second).await;
    assert!(out.contains("succeeded"), "{out}");
    let t = f.c.wait_terminal(&id).await;
    assert_three_records_once(&t, &f.log);
    // Steps 1-3 were not asked again.
    assert_eq!(f.model.asked_for_turn(0), 1);
    assert_eq!(f.model.asked_for_turn(1), 1);
}
