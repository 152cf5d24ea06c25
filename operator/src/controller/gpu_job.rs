//! GPU tasks as Kubernetes Jobs (batch/v1) on the GPU pool.
//!
//! The controller sends every admitted task's work item through one [`TaskQueue::send`]; the
//! distributed operator wraps its SQS queue in a [`JobDispatchQueue`] that sends a task needing GPUs
//! (the controller marks it with the [`ATTR_GPUS`] attribute) as a Job instead: the chart's pod
//! template (the worker image, its service account and environment, the GPU pool's nodeSelector and
//! tolerations) running `agentplane worker --task NS/NAME` with `nvidia.com/gpu` = the count, owned
//! by the AgentTask (deleting the task deletes its Job) and removed `ttlSecondsAfterFinished` after
//! it ends. The pod runs the task through the worker's own code path, so the result lands with the
//! same conditional (exactly-once) completion write as a queued task. CPU tasks go to SQS untouched.
//!
//! Creating the Job is idempotent like the FIFO send it replaces: the Job's name is derived from the
//! task id, so a controller that crashed between creating it and recording Queued finds its own Job
//! (same owner uid) on the retry instead of making a second one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentplane_api::task::AgentTask;
use async_trait::async_trait;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource as _;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sha2::Digest as _;

use crate::queue::{Delivery, DynQueue, LeaseId, Outgoing, QueueError, QueueMessage, TaskQueue};

/// Message attribute the controller sets on a GPU task's work item: the GPU count.
pub const ATTR_GPUS: &str = "gpus";
/// The extended resource a GPU Job's worker container is limited to.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Label on a GPU Job and its pod naming the task.
pub const TASK_LABEL: &str = "agentplane.dev/task";
/// Prefix of the message id recorded in `status.queue.messageId` for a task sent as a Job.
pub const JOB_MESSAGE_PREFIX: &str = "job/";

/// The GPU Job template file (`--gpu-job-template`, rendered by the chart from `gpu.*`).
#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuJobTemplate {
    /// The pod each GPU Job runs. Its first container is the worker: its `args` and the
    /// `nvidia.com/gpu` limit are set per task; everything else (image, env, volumes, service
    /// account, nodeSelector, tolerations) is taken as written.
    pub template: PodTemplateSpec,
    /// Seconds a finished Job (and its pod) is kept before Kubernetes deletes it.
    #[serde(default = "default_ttl")]
    pub ttl_seconds_after_finished: i32,
    /// Pod retries before the Job is Failed (the operator then fails the task).
    #[serde(default = "default_backoff")]
    pub backoff_limit: i32,
    /// Longest a Job may run, in seconds; unset: no limit beyond the worker's model timeout.
    #[serde(default)]
    pub active_deadline_seconds: Option<i64>,
}

fn default_ttl() -> i32 {
    3600
}

fn default_backoff() -> i32 {
    2
}

#[derive(Debug, thiserror::Error)]
pub enum GpuJobError {
    #[error("GPU Job template {path}: {reason}")]
    Template { path: PathBuf, reason: String },
}

impl GpuJobTemplate {
    /// Reads and checks a template file (YAML or JSON).
    pub fn read(path: &Path) -> Result<GpuJobTemplate, GpuJobError> {
        let err = |reason: String| GpuJobError::Template {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let t: GpuJobTemplate = serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let spec = t
            .template
            .spec
            .as_ref()
            .ok_or_else(|| err("template.spec is missing".into()))?;
        let worker = spec.containers.first().ok_or_else(|| {
            err("template.spec.containers is empty: the first is the worker".into())
        })?;
        if worker.image.as_deref().unwrap_or("").is_empty() {
            return Err(err("the worker container has no image".into()));
        }
        if t.ttl_seconds_after_finished < 0 || t.backoff_limit < 0 {
            return Err(err(
                "ttlSecondsAfterFinished and backoffLimit must not be negative".into(),
            ));
        }
        Ok(t)
    }

    /// The first Job that runs task `namespace/name` (object `uid`) with `gpus` GPUs.
    pub fn job_for(&self, namespace: &str, name: &str, uid: &str, gpus: u32) -> Job {
        self.dispatch_job(namespace, name, &job_name(name), uid, gpus)
    }

    /// A Job named `job` that runs task `namespace/name` (object `uid`) with `gpus` GPUs: the
    /// first dispatch's ([`job_for`](Self::job_for)) or a later one's ([`dispatch_job_name`]).
    pub fn dispatch_job(
        &self,
        namespace: &str,
        name: &str,
        job: &str,
        uid: &str,
        gpus: u32,
    ) -> Job {
        let mut template = self.template.clone();
        let labels = template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default);
        labels.insert(TASK_LABEL.into(), name.into());
        let pod = template.spec.get_or_insert_with(Default::default);
        // A retry is a new pod (counted against backoffLimit), never a restart in place.
        pod.restart_policy = Some("Never".into());
        if let Some(worker) = pod.containers.first_mut() {
            worker.args = Some(vec![
                "worker".into(),
                "--task".into(),
                format!("{namespace}/{name}"),
            ]);
            let limits = worker
                .resources
                .get_or_insert_with(Default::default)
                .limits
                .get_or_insert_with(Default::default);
            limits.insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
        }
        Job {
            metadata: ObjectMeta {
                name: Some(job.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(TASK_LABEL.into(), name.into())])),
                owner_references: Some(vec![OwnerReference {
                    api_version: AgentTask::api_version(&()).into_owned(),
                    kind: AgentTask::kind(&()).into_owned(),
                    name: name.into(),
                    uid: uid.into(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..Default::default()
            },
            spec: Some(JobSpec {
                template,
                backoff_limit: Some(self.backoff_limit),
                ttl_seconds_after_finished: Some(self.ttl_seconds_after_finished),
                active_deadline_seconds: self.active_deadline_seconds,
                completions: Some(1),
                parallelism: Some(1),
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// The Job name for a task: `gpu-<task id>`, or, when that would pass the 63 characters a label
/// value (the Job controller labels pods with it) may hold, a prefix of the id and a hash of it.
pub fn job_name(task_id: &str) -> String {
    let plain = format!("gpu-{task_id}");
    if plain.len() <= 63 {
        return plain;
    }
    let digest = hex::encode(sha2::Sha256::digest(task_id.as_bytes()));
    let prefix: String = task_id.chars().take(49).collect();
    format!("gpu-{}-{}", prefix.trim_end_matches('-'), &digest[..8])
}

/// The Job name for one dispatch of a task. The controller sends a task more than once when a plan
/// waits at a step for an approver: the first Job ran up to that step and completed, so the approved
/// remainder needs a Job of its own. The dispatch is told apart by the work item's deduplication id
/// (the task id the first time, `<task>/step/<N>` after an approval at step N).
pub fn dispatch_job_name(task_id: &str, dedup_id: Option<&str>) -> String {
    match dedup_id {
        Some(id) if id != task_id => job_name(&id.replace('/', "-")),
        _ => job_name(task_id),
    }
}

/// The most Jobs one task may have (first dispatch, approvals, hand-backs): a pod that keeps
/// ending without finishing the task must not make Jobs forever.
pub const MAX_JOBS_PER_TASK: usize = 16;

/// The deduplication id of the dispatch after Job `uid` completed without finishing the task (the
/// pod handed it back while the namespace was suspended). Derived from that Job, so an operator that
/// crashed after creating the next Job finds it again, and distinct for every hand-back.
pub fn after_job_dispatch_id(task_id: &str, uid: &str) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    format!("{task_id}/after/{short}")
}

/// How a task's Job stands.
#[derive(Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Not finished (or not yet looked at by the Job controller).
    Active,
    /// The Job ran to completion (its uid names the next dispatch when the task was handed back).
    Complete { uid: String },
    /// The Job gave up; the condition's reason and message.
    Failed(String),
    /// There is no Job for the task.
    Missing,
}

/// Reads the Job `name` and says how it stands.
pub async fn job_outcome(jobs: &Api<Job>, name: &str) -> Result<JobOutcome, kube::Error> {
    let Some(job) = jobs.get_opt(name).await? else {
        return Ok(JobOutcome::Missing);
    };
    let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
    let holds = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    if let Some(c) = holds("Failed") {
        return Ok(JobOutcome::Failed(format!(
            "{}: {}",
            c.reason.as_deref().unwrap_or("Failed"),
            c.message.as_deref().unwrap_or("no message")
        )));
    }
    if holds("Complete").is_some() {
        return Ok(JobOutcome::Complete {
            uid: job.metadata.uid.clone().unwrap_or_default(),
        });
    }
    Ok(JobOutcome::Active)
}

/// The operator's queue: GPU work items become Jobs, everything else goes to `inner` (SQS).
pub struct JobDispatchQueue {
    inner: DynQueue,
    jobs: Api<Job>,
    tasks: Api<AgentTask>,
    namespace: String,
    template: GpuJobTemplate,
}

impl JobDispatchQueue {
    pub fn new(
        inner: DynQueue,
        client: kube::Client,
        namespace: &str,
        template: GpuJobTemplate,
    ) -> JobDispatchQueue {
        JobDispatchQueue {
            inner,
            jobs: Api::namespaced(client.clone(), namespace),
            tasks: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            template,
        }
    }

    /// Creates the task's Job `name` (or finds the one an earlier attempt created) and returns its
    /// message id, `job/<name>`.
    async fn create_job(
        &self,
        task_name: &str,
        name: &str,
        gpus: u32,
    ) -> Result<String, QueueError> {
        let task = self
            .tasks
            .get(task_name)
            .await
            .map_err(|e| QueueError::backend(format!("reading AgentTask {task_name}: {e}")))?;
        let uid = task
            .metadata
            .uid
            .clone()
            .ok_or_else(|| QueueError::backend(format!("AgentTask {task_name} has no uid")))?;
        let job = self
            .template
            .dispatch_job(&self.namespace, task_name, name, &uid, gpus);
        match self.jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {
                tracing::info!(task = %task_name, job = %name, gpus, "GPU Job created");
            }
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                let existing = self
                    .jobs
                    .get(name)
                    .await
                    .map_err(|e| QueueError::backend(format!("reading Job {name}: {e}")))?;
                let ours = existing
                    .metadata
                    .owner_references
                    .unwrap_or_default()
                    .iter()
                    .any(|o| o.uid == uid);
                if !ours {
                    return Err(QueueError::backend(format!(
                        "Job {name} exists but is not owned by AgentTask {task_name} (uid {uid})"
                    )));
                }
                tracing::debug!(task = %task_name, job = %name, "GPU Job already created");
            }
            Err(e) => {
                return Err(QueueError::backend(format!("creating Job {name}: {e}")));
            }
        }
        Ok(format!("{JOB_MESSAGE_PREFIX}{name}"))
    }
}

#[async_trait]
impl TaskQueue for JobDispatchQueue {
    async fn send(&self, message: Outgoing) -> Result<String, QueueError> {
        let gpus = match message.attributes.get(ATTR_GPUS) {
            None => return self.inner.send(message).await,
            Some(raw) => raw.parse::<u32>().map_err(|e| {
                QueueError::backend(format!("work item attribute {ATTR_GPUS}={raw:?}: {e}"))
            })?,
        };
        if gpus == 0 {
            return self.inner.send(message).await;
        }
        let body: QueueMessage = serde_json::from_str(&message.body)
            .map_err(|e| QueueError::backend(format!("work item body: {e}")))?;
        let name = dispatch_job_name(&body.task.name, message.dedup_id.as_deref());
        self.create_job(&body.task.name, &name, gpus).await
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.inner.receive(max, visibility, wait).await
    }

    async fn extend(&self, lease: &LeaseId, visibility: Duration) -> Result<(), QueueError> {
        self.inner.extend(lease, visibility).await
    }

    async fn release(&self, lease: &LeaseId, delay: Duration) -> Result<(), QueueError> {
        self.inner.release(lease, delay).await
    }

    async fn delete(&self, lease: &LeaseId) -> Result<(), QueueError> {
        self.inner.delete(lease).await
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        self.inner.depth().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> GpuJobTemplate {
        serde_yaml::from_str(
            r#"
template:
  spec:
    serviceAccountName: agentplane-worker
    nodeSelector: {agentplane.dev/pool: gpu}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
    containers:
      - name: worker
        image: agentplane:test
        resources: {limits: {memory: 1Gi}}
ttlSecondsAfterFinished: 600
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_job_runs_one_task_with_its_gpus_on_the_pool() {
        let job = template().job_for("ns", "t-1", "uid-1", 2);
        assert_eq!(job.metadata.name.as_deref(), Some("gpu-t-1"));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("AgentTask", "uid-1", Some(true))
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.ttl_seconds_after_finished, Some(600));
        assert_eq!(spec.backoff_limit, Some(2));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.node_selector.unwrap()["agentplane.dev/pool"], "gpu");
        let worker = &pod.containers[0];
        assert_eq!(
            worker.args.as_deref().unwrap(),
            ["worker", "--task", "ns/t-1"]
        );
        let limits = worker.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("2".into()));
        assert_eq!(limits["memory"], Quantity("1Gi".into()));
    }

    #[test]
    fn a_dispatch_after_an_approval_gets_a_job_of_its_own() {
        assert_eq!(dispatch_job_name("t-1", None), "gpu-t-1");
        assert_eq!(dispatch_job_name("t-1", Some("t-1")), "gpu-t-1");
        assert_eq!(
            dispatch_job_name("t-1", Some("t-1/step/4")),
            "gpu-t-1-step-4"
        );
        let long = "x".repeat(60);
        let first = dispatch_job_name(&long, Some(&long));
        let later = dispatch_job_name(&long, Some(&format!("{long}/step/4")));
        assert!(first.len() <= 63 && later.len() <= 63, "{first} {later}");
        assert_ne!(first, later);
        let job = template().dispatch_job("ns", "t-1", "gpu-t-1-step-4", "uid-1", 1);
        assert_eq!(job.metadata.name.as_deref(), Some("gpu-t-1-step-4"));
        // The pod still runs the task itself, not the step.
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0].args.as_deref().unwrap(),
            ["worker", "--task", "ns/t-1"]
        );
    }

    #[test]
    fn a_hand_back_is_followed_by_a_job_named_after_the_one_that_ended() {
        let a = after_job_dispatch_id("t-1", "5f0c2a9e-1111-2222-3333-444455556666");
        assert_eq!(a, "t-1/after/5f0c2a9e");
        // The same ended Job always gives the same next one (an operator that crashed after
        // creating it finds it again); another ended Job gives another.
        assert_eq!(
            a,
            after_job_dispatch_id("t-1", "5f0c2a9e-1111-2222-3333-444455556666")
        );
        let b = after_job_dispatch_id("t-1", "77aa0000-1111-2222-3333-444455556666");
        assert_ne!(
            dispatch_job_name("t-1", Some(&a)),
            dispatch_job_name("t-1", Some(&b))
        );
        assert_eq!(dispatch_job_name("t-1", Some(&a)), "gpu-t-1-after-5f0c2a9e");
    }

    #[test]
    fn job_names_fit_a_label_value() {
        assert_eq!(job_name("abc"), "gpu-abc");
        let long = "a".repeat(63);
        let name = job_name(&long);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(job_name(&"a".repeat(62)), name);
    }

    #[test]
    fn a_template_without_a_worker_container_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu-job.yaml");
        std::fs::write(&path, "template: {spec: {containers: []}}\n").unwrap();
        let e = GpuJobTemplate::read(&path).unwrap_err().to_string();
        assert!(e.contains("containers is empty"), "{e}");
        std::fs::write(&path, "template: {}\nbogus: 1\n").unwrap();
        let e = GpuJobTemplate::read(&path).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
