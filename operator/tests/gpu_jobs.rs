//! GPU tasks as Kubernetes Jobs, against kube-apiserver + etcd and SQS on moto with the real
//! `agentplane operator` process. There is no kubelet or Job controller here, so the test plays
//! their parts through the API: it runs the Job's own container command (`agentplane worker --task
//! NS/NAME`) as the pod, and writes the Job's status as the Job controller would.

mod cluster;

use std::time::Duration;

use agentplane::client::DeviceIdentity;
use agentplane::controller::gpu_job::{GPU_RESOURCE, TASK_LABEL, job_name};
use agentplane::store::{StoreError, TaskStore};
use agentplane_api::envelope::{Envelope, INTENT_PAYLOAD_TYPE};
use agentplane_api::policy::{EndpointKind, ModelTier};
use agentplane_api::task::{AgentTask, AgentTaskSpec};
use agentplane_api::{IntentPayload, TaskPhase};
use cluster::Cluster;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams};

const TEMPLATE: &str = r#"
template:
  spec:
    serviceAccountName: agentplane-worker
    nodeSelector:
      agentplane.dev/pool: gpu
    tolerations:
      - key: nvidia.com/gpu
        operator: Exists
        effect: NoSchedule
    containers:
      - name: worker
        image: ghcr.io/agentplane/agentplane:test
        resources:
          limits: {memory: 2Gi}
ttlSecondsAfterFinished: 900
backoffLimit: 1
"#;

/// Admits a task whose signed payload carries `"gpu": true`, as envelopes signed before the field
/// became a count do (the signature covers those exact bytes).
async fn admit_old_boolean(c: &Cluster, d: &DeviceIdentity, seq: u64) -> String {
    let mut payload = d.intent(seq, "summarize", "signed with the boolean");
    let mut raw = serde_json::to_value(&payload).unwrap();
    raw["requiredResources"]["gpu"] = serde_json::json!(true);
    let bytes = serde_json::to_vec(&raw).unwrap();
    let envelope = Envelope::sign_bytes(INTENT_PAYLOAD_TYPE, &bytes, &d.key_id, &d.key).unwrap();
    payload.required_resources.gpu = 1;
    c.store
        .admit(agentplane::store::NewTask {
            id: payload.task_id.clone(),
            spec: AgentTaskSpec::for_payload(envelope, &payload),
            seq,
            trace_id: None,
        })
        .await
        .unwrap();
    payload.task_id
}

fn gpu_payload(d: &DeviceIdentity, seq: u64, gpus: u32) -> IntentPayload {
    let mut p = d.intent(seq, "summarize", "on the gpu");
    p.required_resources.gpu = gpus;
    p
}

async fn wait_job(jobs: &Api<Job>, task: &str) -> Job {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(j) = jobs.get_opt(&job_name(task)).await.unwrap() {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Job for {task} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The job controller's part: status conditions as it writes them when a Job ends.
async fn set_job_status(jobs: &Api<Job>, task: &str, status: serde_json::Value) {
    jobs.patch_status(
        &job_name(task),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap_or_else(|e| panic!("writing Job status for {task}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_task_runs_as_a_job_on_the_gpu_pool_and_completes_exactly_once() {
    let c = Cluster::new("gpu").await;
    let mut policy = cluster::policy();
    policy.models.insert(
        0,
        ModelTier {
            name: "gpu-echo".into(),
            endpoint_kind: EndpointKind::Builtin,
            endpoint: "builtin:echo".into(),
            model: None,
            price_per_1k_input_micros: 100,
            price_per_1k_output_micros: 200,
            privacy_levels: vec![],
            gpu: true,
            secret_ref: None,
        },
    );
    c.store.put_policy(policy).await.unwrap();
    let template = c.logs.path().join("gpu-job.yaml");
    std::fs::write(&template, TEMPLATE).unwrap();
    let _operator = c.operator_with(
        "op-gpu",
        &[(
            "AGENTPLANE_GPU_JOB_TEMPLATE",
            template.display().to_string(),
        )],
    );

    let d = c.device("kiosk-gpu").await;
    let cpu = c.admit(&d, &d.intent(1, "summarize", "on the cpu")).await;
    let gpu = c.admit(&d, &gpu_payload(&d, 2, 2)).await;
    let old = admit_old_boolean(&c, &d, 3).await;
    let queued = |p| p == TaskPhase::Queued;
    let cpu_task = c.wait_phase(&cpu, queued, Duration::from_secs(60)).await;
    let gpu_queued = c.wait_phase(&gpu, queued, Duration::from_secs(60)).await;
    c.wait_phase(&old, queued, Duration::from_secs(60)).await;

    // CPU work goes to SQS; GPU work does not.
    assert_eq!(c.depth().await, 1, "only the CPU task is on the queue");
    assert!(
        !cpu_task
            .status
            .queue
            .unwrap()
            .message_id
            .unwrap()
            .starts_with("job/")
    );
    let jobs: Api<Job> = Api::namespaced(c.client.clone(), &c.namespace);
    assert!(jobs.get_opt(&job_name(&cpu)).await.unwrap().is_none());
    assert_eq!(
        gpu_queued
            .status
            .queue
            .as_ref()
            .unwrap()
            .message_id
            .as_deref(),
        Some(format!("job/{}", job_name(&gpu)).as_str())
    );
    assert_eq!(
        gpu_queued
            .status
            .model
            .as_ref()
            .unwrap()
            .selected
            .as_deref(),
        Some("gpu-echo")
    );

    // The Job as stored by kube-apiserver: owned by the task, on the pool, limited to its GPUs.
    let job = wait_job(&jobs, &gpu).await;
    let tasks: Api<AgentTask> = Api::namespaced(c.client.clone(), &c.namespace);
    let owner_uid = tasks.get(&gpu).await.unwrap().metadata.uid.unwrap();
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str(),
            owner.controller
        ),
        (
            "agentplane.dev/v1alpha1",
            "AgentTask",
            gpu.as_str(),
            owner_uid.as_str(),
            Some(true)
        )
    );
    assert_eq!(job.metadata.labels.as_ref().unwrap()[TASK_LABEL], gpu);
    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.ttl_seconds_after_finished, Some(900));
    assert_eq!(spec.backoff_limit, Some(1));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["agentplane.dev/pool"],
        "gpu"
    );
    let toleration = &pod.tolerations.as_ref().unwrap()[0];
    assert_eq!(
        (
            toleration.key.as_deref(),
            toleration.operator.as_deref(),
            toleration.effect.as_deref()
        ),
        (Some("nvidia.com/gpu"), Some("Exists"), Some("NoSchedule"))
    );
    let worker = &pod.containers[0];
    let limits = worker.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits[GPU_RESOURCE].0, "2");
    assert_eq!(limits["memory"].0, "2Gi");
    let args = worker.args.clone().unwrap();
    assert_eq!(
        args,
        ["worker", "--task", &format!("{}/{gpu}", c.namespace)]
    );
    // The envelope signed with `"gpu": true` verified and became a one-GPU Job.
    let old_job = wait_job(&jobs, &old).await;
    let old_limits = old_job.spec.unwrap().template.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(old_limits[GPU_RESOURCE].0, "1");

    // The pod: the Job's own container command, run to completion.
    let out = c.run_command(&args).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("succeeded"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let done = c.store.get_task(&gpu).await.unwrap().unwrap();
    assert_eq!(done.phase(), TaskPhase::Succeeded, "{:?}", done.status);
    assert_eq!(done.status.result.as_deref(), Some("echo: on the gpu"));
    assert!(done.status.usage.unwrap().cost_micros > 0);
    let completions = |t: &agentplane::store::TaskRecord| {
        t.status
            .conditions
            .iter()
            .filter(|c| c.type_ == "Completed" && c.status == "True")
            .count()
    };
    assert_eq!(completions(&done), 1);

    // A second pod for the same task (a Job retry, a duplicate): it finds the task finished and
    // writes nothing.
    let again = c.run_command(&args).output().await.unwrap();
    let again_out = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && again_out.contains("already finished"),
        "{:?}\n{again_out}\n{}",
        again.status,
        String::from_utf8_lossy(&again.stderr)
    );
    // A completion written from an earlier read (a racing pod that read the task while Queued) is
    // refused by the API server: the completion write is conditional on the version read.
    let mut stale = gpu_queued.status.clone();
    stale.phase = Some(TaskPhase::Succeeded);
    stale.result = Some("a second completion".into());
    let refused = c
        .store
        .update_task_status(&gpu, &gpu_queued.version, stale)
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
    let after = c.store.get_task(&gpu).await.unwrap().unwrap();
    assert_eq!(
        after.version, done.version,
        "nothing was written after the completion"
    );
    assert_eq!(after.status.result.as_deref(), Some("echo: on the gpu"));
    assert_eq!(completions(&after), 1);

    // The Job controller marks the finished Job Complete; the operator leaves the task as it is.
    let now = jiff::Timestamp::now().to_string();
    set_job_status(
        &jobs,
        &gpu,
        serde_json::json!({
            "startTime": now, "completionTime": now, "succeeded": 1,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now},
            ],
        }),
    )
    .await;
    // The other Job's pods never come up (no GPU node): the Job controller gives up, and the
    // operator fails that task with the Job's reason.
    set_job_status(
        &jobs,
        &old,
        serde_json::json!({
            "startTime": now, "failed": 2,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit", "lastTransitionTime": now},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit", "lastTransitionTime": now},
            ],
        }),
    )
    .await;
    let failed = c.wait_terminal(&old).await;
    assert_eq!(failed.phase(), TaskPhase::Failed, "{:?}", failed.status);
    let reason = failed.status.reason.unwrap();
    assert!(
        reason.starts_with("gpu_job_failed: ") && reason.contains("BackoffLimitExceeded"),
        "{reason}"
    );
    let still = c.store.get_task(&gpu).await.unwrap().unwrap();
    assert_eq!(still.version, done.version, "{:?}", still.status);
}
