//! The distributed task store: the Kubernetes API, where every record is a custom resource.
//!
//! - A task is an `AgentTask` named by its task id; its version is the resourceVersion, and status
//!   writes are server-side applies that carry that resourceVersion, so the API server itself refuses a
//!   write based on a stale read (409 -> [`StoreError::Conflict`]). Every runtime component applies
//!   status under the one field manager [`FIELD_MANAGER`], so a field one component leaves out of its
//!   apply (a cleared `reason`, say) is removed, exactly as in the embedded store.
//! - Devices are `EdgeDevice`s; the replay guard is `status.lastSeq` with its window map
//!   `status.seqWindow` (see `seq_window`), moved with a write conditional on the device's
//!   resourceVersion (and a CEL rule that refuses any move of lastSeq backwards).
//! - An approver's decision is an `AgentApproval` (generated name `<task>-…`, labelled with its task),
//!   created by the gateway; the task itself is not written, so recording one needs no access to task
//!   status. The operator's controller watches them and maps each to its task.
//! - The policy is the `AgentPolicy` named `default`, cached from a watch.
//! - Join tokens live, hashed, in the Secret [`JOIN_TOKENS_SECRET`]; spending one is a conditional
//!   replace of that Secret.
//! - [`TaskStore::changes`] is fed by a watch on AgentTasks, started by the first subscriber.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use agentplane_api::TaskPhase;
use agentplane_api::approval::{AgentApproval, AgentApprovalSpec, TASK_LABEL, TaskRef};
use agentplane_api::device::{EdgeDevice, EdgeDeviceSpec, EdgeDeviceStatus, SEQ_WINDOW};
use agentplane_api::policy::{
    AgentPolicy, AgentPolicySpec, AgentPolicyStatus, BreakerTrip, ModelTier,
};
use agentplane_api::task::{
    AgentTask, AgentTaskSpec, AgentTaskStatus, Approval, TRACEPARENT_ANNOTATION,
};
use agentplane_api::wire::traceparent_trace_id;
use async_trait::async_trait;
use futures::StreamExt as _;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource as _, ResourceExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::seq_window::{SeqRefusal, SeqWindow};
use super::{
    Admission, DecisionRecord, DeviceRecord, EnrollOutcome, Enrollment, NewTask, StoreError,
    TaskChanged, TaskRecord, TaskStore, Version,
};

/// The field manager of every write the runtime makes.
pub const FIELD_MANAGER: &str = "agentplane";
/// Set on every AgentTask at creation; the operator removes it once a deleted task is accounted for.
pub const FINALIZER: &str = "agentplane.dev/cleanup";
/// The namespace's policy object.
pub const POLICY_NAME: &str = "default";
/// The Secret holding join-token hashes (never the tokens).
pub const JOIN_TOKENS_SECRET: &str = "agentplane-join-tokens";

/// How often the store retries a read-modify-write that keeps losing races before giving up.
const CAS_ATTEMPTS: usize = 8;
/// The same for recording a seq in a device's window: a device may have `SEQ_WINDOW` submissions in
/// flight, all writing the one EdgeDevice, and each lost race means another of them got through.
const SEQ_CLAIM_ATTEMPTS: usize = 2 * SEQ_WINDOW as usize;
/// Labels on every AgentTask the gateway creates.
pub const DEVICE_LABEL: &str = "agentplane.dev/device";
pub const SEQ_LABEL: &str = "agentplane.dev/seq";

/// One join token's record in the Secret (its key is the token's SHA-256).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
struct JoinTokenRecord {
    /// Unix seconds.
    expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    used_by: Option<String>,
}

type PolicyCache = Arc<RwLock<Option<Option<AgentPolicySpec>>>>;

pub struct KubeStore {
    namespace: String,
    tasks: Api<AgentTask>,
    approvals: Api<AgentApproval>,
    devices: Api<EdgeDevice>,
    policies: Api<AgentPolicy>,
    secrets: Api<Secret>,
    changes: broadcast::Sender<TaskChanged>,
    /// `Some(p)` once the policy watch has listed; `None` until then (reads go to the API).
    policy: PolicyCache,
    /// The cluster's model tier ladder, for a policy that lists no `models` of its own.
    default_tiers: Vec<ModelTier>,
    watchers: Vec<JoinHandle<()>>,
    /// The AgentTask watch behind `changes()`, started by the first subscriber: the operator has
    /// its controller's own watch and would only pay twice for a second one.
    task_watch: std::sync::OnceLock<JoinHandle<()>>,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        for w in self.watchers.iter().chain(self.task_watch.get()) {
            w.abort();
        }
    }
}

/// Maps an API error to the store's error for a record of `kind` named `id`.
pub(super) fn api_error(kind: &'static str, id: &str, e: kube::Error) -> StoreError {
    match &e {
        kube::Error::Api(s) if s.is_not_found() => StoreError::NotFound {
            kind,
            id: id.to_owned(),
        },
        kube::Error::Api(s) if s.is_conflict() => StoreError::Conflict {
            kind,
            id: id.to_owned(),
            expected: String::new(),
        },
        kube::Error::Api(s) => StoreError::Backend(format!(
            "{kind} {id}: the API server answered {} {}: {}",
            s.code, s.reason, s.message
        )),
        _ => StoreError::Backend(format!("{kind} {id}: {e}")),
    }
}

fn is_status(e: &kube::Error, pred: fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(s) if pred(s))
}

/// The record for an AgentTask object.
pub fn task_record(obj: &AgentTask) -> TaskRecord {
    let mut status = obj.status.clone().unwrap_or_default();
    if status.trace_id.is_none() {
        status.trace_id = obj
            .annotations()
            .get(TRACEPARENT_ANNOTATION)
            .and_then(|tp| traceparent_trace_id(tp))
            .map(str::to_owned);
    }
    TaskRecord {
        id: obj.name_any(),
        spec: obj.spec.clone(),
        status,
        created_at: obj
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now),
        version: Version(obj.resource_version().unwrap_or_default()),
    }
}

fn device_record(obj: &EdgeDevice) -> DeviceRecord {
    DeviceRecord {
        name: obj.name_any(),
        spec: obj.spec.clone(),
        status: obj.status.clone().unwrap_or_default(),
        version: Version(obj.resource_version().unwrap_or_default()),
    }
}

fn decision_record(obj: &AgentApproval) -> DecisionRecord {
    DecisionRecord {
        name: obj.name_any(),
        task_id: obj.spec.task_ref.name.clone(),
        approval: obj.spec.approval.clone(),
    }
}

fn publish(changes: &broadcast::Sender<TaskChanged>, task: TaskRecord) {
    // No receivers is fine: nobody is watching yet.
    let _ = changes.send(TaskChanged {
        id: task.id.clone(),
        phase: task.phase(),
        cancel_requested: task.spec.cancel_requested(),
        task: Arc::new(task),
    });
}

impl KubeStore {
    /// A store over `namespace`, with its task and policy watches started.
    pub fn new(client: Client, namespace: impl Into<String>) -> Arc<KubeStore> {
        Self::with_default_tiers(client, namespace, Vec::new())
    }

    /// A store whose policy falls back to `default_tiers` when it lists no models (the chart's
    /// `agentplane-models` ConfigMap).
    pub fn with_default_tiers(
        client: Client,
        namespace: impl Into<String>,
        default_tiers: Vec<ModelTier>,
    ) -> Arc<KubeStore> {
        let namespace = namespace.into();
        let (changes, _) = broadcast::channel(4096);
        let policy: PolicyCache = Arc::new(RwLock::new(None));
        let tasks: Api<AgentTask> = Api::namespaced(client.clone(), &namespace);
        let policies: Api<AgentPolicy> = Api::namespaced(client.clone(), &namespace);
        let watchers = vec![tokio::spawn(watch_policy(policies.clone(), policy.clone()))];
        Arc::new(KubeStore {
            devices: Api::namespaced(client.clone(), &namespace),
            approvals: Api::namespaced(client.clone(), &namespace),
            secrets: Api::namespaced(client, &namespace),
            tasks,
            policies,
            namespace,
            changes,
            policy,
            default_tiers,
            watchers,
            task_watch: std::sync::OnceLock::new(),
        })
    }

    /// The AgentTask API of this namespace (for the operator's controller).
    pub fn tasks_api(&self) -> &Api<AgentTask> {
        &self.tasks
    }

    /// The AgentApproval API of this namespace (for the operator's controller, which watches it).
    pub fn approvals_api(&self) -> &Api<AgentApproval> {
        &self.approvals
    }

    /// Records `seq` in the device's replay window (lastSeq moves up to it if it is higher):
    /// `Ok(Ok(()))` when recorded, `Ok(Err(refusal))` when the window, as it now stands, refuses it
    /// (another task took the seq, or lastSeq moved so far that it fell out). The write is conditional
    /// on the device's resourceVersion; it starts from the record the caller read and re-reads only
    /// after losing a race.
    async fn claim_seq(
        &self,
        device: DeviceRecord,
        seq: u64,
    ) -> Result<Result<(), SeqRefusal>, StoreError> {
        let name = device.name.clone();
        let mut current = Some(device);
        for _ in 0..SEQ_CLAIM_ATTEMPTS {
            let device = match current.take() {
                Some(d) => d,
                None => self
                    .get_device(&name)
                    .await?
                    .ok_or_else(|| StoreError::NotFound {
                        kind: "EdgeDevice",
                        id: name.clone(),
                    })?,
            };
            let window = match SeqWindow::of(&device.status).admit(seq) {
                Ok(w) => w,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let mut status = EdgeDeviceStatus {
                last_seen: Some(Time(Timestamp::now())),
                ..device.status
            };
            window.store_in(&mut status);
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": device.version.0 },
                "status": status,
            });
            match self
                .devices
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(Ok(())),
                Err(e) if is_status(&e, kube::core::Status::is_conflict) => continue,
                Err(e) => return Err(api_error("EdgeDevice", &name, e)),
            }
        }
        Err(StoreError::Backend(format!(
            "EdgeDevice {name}: its replay window kept changing; gave up after {SEQ_CLAIM_ATTEMPTS} attempts"
        )))
    }

    async fn join_tokens(
        &self,
    ) -> Result<(Option<String>, BTreeMap<String, JoinTokenRecord>), StoreError> {
        let Some(secret) = self
            .secrets
            .get_opt(JOIN_TOKENS_SECRET)
            .await
            .map_err(|e| api_error("Secret", JOIN_TOKENS_SECRET, e))?
        else {
            return Ok((None, BTreeMap::new()));
        };
        let mut tokens = BTreeMap::new();
        for (hash, value) in secret.data.clone().unwrap_or_default() {
            match serde_json::from_slice::<JoinTokenRecord>(&value.0) {
                Ok(rec) => {
                    tokens.insert(hash, rec);
                }
                // A hand-edited entry: skip it rather than lock every enrollment out.
                Err(e) => tracing::warn!(token = %hash, error = %e, "unreadable join token record"),
            }
        }
        Ok((secret.resource_version(), tokens))
    }

    /// Writes the token map, conditional on the Secret's version (`None`: create it).
    async fn put_join_tokens(
        &self,
        version: Option<String>,
        tokens: &BTreeMap<String, JoinTokenRecord>,
    ) -> Result<(), StoreError> {
        let data = tokens
            .iter()
            .map(|(k, v)| {
                serde_json::to_vec(v)
                    .map(|b| (k.clone(), ByteString(b)))
                    .map_err(StoreError::backend)
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(JOIN_TOKENS_SECRET.into()),
                namespace: Some(self.namespace.clone()),
                resource_version: version.clone(),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "agentplane".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let result = match version {
            None => self.secrets.create(&PostParams::default(), &secret).await,
            Some(_) => {
                self.secrets
                    .replace(JOIN_TOKENS_SECRET, &PostParams::default(), &secret)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, kube::core::Status::is_already_exists) => {
                Err(StoreError::Conflict {
                    kind: "Secret",
                    id: JOIN_TOKENS_SECRET.into(),
                    expected: "absent".into(),
                })
            }
            Err(e) => Err(api_error("Secret", JOIN_TOKENS_SECRET, e)),
        }
    }

    async fn list_matching(
        &self,
        keep: impl Fn(&TaskRecord) -> bool,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let mut out = Vec::new();
        let mut params = ListParams::default().limit(500);
        loop {
            let page = self
                .tasks
                .list(&params)
                .await
                .map_err(|e| api_error("AgentTask", "(list)", e))?;
            out.extend(page.items.iter().map(task_record).filter(|t| keep(t)));
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => params = params.continue_token(&c),
                _ => break,
            }
        }
        out.sort_by_key(|t| t.created_at);
        Ok(out)
    }
}

/// Publishes every AgentTask change; restarts the watch with backoff on errors.
async fn watch_tasks(api: Api<AgentTask>, changes: broadcast::Sender<TaskChanged>) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Apply(obj) | Event::InitApply(obj)) => publish(&changes, task_record(&obj)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "AgentTask watch failed; retrying"),
        }
    }
}

/// Keeps the policy cache current.
async fn watch_policy(api: Api<AgentPolicy>, cache: PolicyCache) {
    let config = watcher::Config::default().fields(&format!("metadata.name={POLICY_NAME}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut listed: Option<AgentPolicySpec> = None;
    while let Some(ev) = stream.next().await {
        let set = |v: Option<AgentPolicySpec>| {
            *cache.write().unwrap_or_else(|e| e.into_inner()) = Some(v);
        };
        match ev {
            Ok(Event::Init) => listed = None,
            Ok(Event::InitApply(p)) => listed = Some(p.spec),
            Ok(Event::InitDone) => set(listed.take()),
            Ok(Event::Apply(p)) => set(Some(p.spec)),
            Ok(Event::Delete(_)) => set(None),
            Err(e) => {
                // Until the watch recovers, read through to the API server.
                *cache.write().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::warn!(error = %e, "AgentPolicy watch failed; retrying");
            }
        }
    }
}

#[async_trait]
impl TaskStore for KubeStore {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn admit(&self, task: NewTask) -> Result<Admission, StoreError> {
        // Three API calls on the common path (read the device, create, record the seq); the task is
        // looked up only when the window refuses its seq, to tell a resubmission from a replay.
        let device_name = task.spec.device_ref.name.clone();
        let device = self
            .get_device(&device_name)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "EdgeDevice",
                id: device_name.clone(),
            })?;
        if let Err(refusal) = SeqWindow::of(&device.status).check(task.seq) {
            return Ok(match self.get_task(&task.id).await? {
                Some(existing) => Admission::Existing(existing),
                None => Admission::SeqReplay(refusal),
            });
        }
        let mut annotations = BTreeMap::new();
        // The admitting span (the gateway's hop) when it is in the task's trace, so the operator's
        // reconcile becomes its child; else a fresh span id under the task's trace id.
        if let Some(trace_id) = &task.trace_id
            && let Some(tp) = crate::telemetry::hop_traceparent(&tracing::Span::current(), trace_id)
        {
            annotations.insert(TRACEPARENT_ANNOTATION.to_owned(), tp);
        }
        let obj = AgentTask {
            metadata: ObjectMeta {
                name: Some(task.id.clone()),
                namespace: Some(self.namespace.clone()),
                // Present from birth, so the operator never spends a write adding it.
                finalizers: Some(vec![FINALIZER.to_owned()]),
                annotations: (!annotations.is_empty()).then_some(annotations),
                // Device and seq as labels, so `kubectl get atask -l` finds the task holding a seq
                // (the guard itself is the device's window, not a label query).
                labels: Some(BTreeMap::from([
                    (DEVICE_LABEL.to_owned(), device_name.clone()),
                    (SEQ_LABEL.to_owned(), task.seq.to_string()),
                ])),
                ..Default::default()
            },
            spec: task.spec.clone(),
            status: None,
        };
        let created = match self.tasks.create(&PostParams::default(), &obj).await {
            Ok(o) => o,
            Err(e) if is_status(&e, kube::core::Status::is_already_exists) => {
                return match self.get_task(&task.id).await? {
                    Some(existing) => Ok(Admission::Existing(existing)),
                    None => Err(StoreError::Conflict {
                        kind: "AgentTask",
                        id: task.id,
                        expected: "absent".into(),
                    }),
                };
            }
            Err(e) => return Err(api_error("AgentTask", &task.id, e)),
        };
        // The task exists; now record its seq in the device's window. Losing the seq to a concurrent
        // submission (another task id under the same seq, or so many higher seqs that this one slid
        // out of the window) makes this one a replay after all: take it back. A crash in between
        // leaves a task whose resubmission is answered `Existing`, never a burnt seq without a task.
        match self.claim_seq(device, task.seq).await? {
            Ok(()) => {
                let mut record = task_record(&created);
                record.status.phase = Some(TaskPhase::Pending);
                Ok(Admission::Created(record))
            }
            Err(refusal) => {
                self.withdraw(&task.id, task.seq, refusal).await;
                Ok(Admission::SeqReplay(refusal))
            }
        }
    }

    async fn get_task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self
            .tasks
            .get_opt(id)
            .await
            .map_err(|e| api_error("AgentTask", id, e))?
            .map(|o| task_record(&o)))
    }

    async fn list_unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.list_matching(|t| !t.phase().is_terminal()).await
    }

    async fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.list_matching(|_| true).await
    }

    async fn update_task_status(
        &self,
        id: &str,
        expected: &Version,
        status: AgentTaskStatus,
    ) -> Result<TaskRecord, StoreError> {
        // Server-side apply carrying the resourceVersion read: the API server refuses it with 409 if
        // anything was written since, which is the conditional write the worker's exactly-once needs.
        let apply = serde_json::json!({
            "apiVersion": AgentTask::api_version(&()),
            "kind": AgentTask::kind(&()),
            "metadata": { "name": id, "resourceVersion": expected.0 },
            "status": status,
        });
        match self
            .tasks
            .patch_status(
                id,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await
        {
            Ok(obj) => {
                let record = task_record(&obj);
                publish(&self.changes, record.clone());
                Ok(record)
            }
            Err(e) if is_status(&e, kube::core::Status::is_conflict) => Err(StoreError::Conflict {
                kind: "AgentTask",
                id: id.to_owned(),
                expected: expected.0.clone(),
            }),
            Err(e) => Err(api_error("AgentTask", id, e)),
        }
    }

    async fn request_cancel(&self, id: &str) -> Result<TaskRecord, StoreError> {
        let patch = serde_json::json!({ "spec": { "cancel": true } });
        let obj = self
            .tasks
            .patch(id, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error("AgentTask", id, e))?;
        let record = task_record(&obj);
        publish(&self.changes, record.clone());
        Ok(record)
    }

    async fn record_decision(
        &self,
        task_id: &str,
        approval: Approval,
    ) -> Result<DecisionRecord, StoreError> {
        let obj = AgentApproval {
            metadata: ObjectMeta {
                generate_name: Some(format!("{task_id}-")),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    TASK_LABEL.to_owned(),
                    task_id.to_owned(),
                )])),
                ..Default::default()
            },
            spec: AgentApprovalSpec {
                task_ref: TaskRef {
                    name: task_id.to_owned(),
                },
                approval,
            },
        };
        let created = self
            .approvals
            .create(&PostParams::default(), &obj)
            .await
            .map_err(|e| api_error("AgentApproval", task_id, e))?;
        // The operator's controller sees the new object through its own watch of AgentApprovals.
        Ok(decision_record(&created))
    }

    async fn decisions(&self, task_id: &str) -> Result<Vec<DecisionRecord>, StoreError> {
        let params = ListParams::default().labels(&format!("{TASK_LABEL}={task_id}"));
        let list = self
            .approvals
            .list(&params)
            .await
            .map_err(|e| api_error("AgentApproval", task_id, e))?;
        // The label is only an index: a decision counts for the task its spec names.
        let mut out: Vec<(Timestamp, DecisionRecord)> = list
            .items
            .iter()
            .filter(|a| a.spec.task_ref.name == task_id)
            .map(|a| {
                let created = a
                    .meta()
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or(Timestamp::UNIX_EPOCH);
                (created, decision_record(a))
            })
            .collect();
        // Oldest first; the name breaks ties within the API server's one-second timestamps.
        out.sort_by(|(a, x), (b, y)| (a, &x.name).cmp(&(b, &y.name)));
        Ok(out.into_iter().map(|(_, d)| d).collect())
    }

    async fn get_device(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .devices
            .get_opt(name)
            .await
            .map_err(|e| api_error("EdgeDevice", name, e))?
            .map(|o| device_record(&o)))
    }

    async fn put_device(
        &self,
        name: &str,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError> {
        let apply = serde_json::json!({
            "apiVersion": EdgeDevice::api_version(&()),
            "kind": EdgeDevice::kind(&()),
            "metadata": { "name": name },
            "spec": spec,
        });
        let obj = self
            .devices
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await
            .map_err(|e| api_error("EdgeDevice", name, e))?;
        Ok(device_record(&obj))
    }

    async fn update_device_spec(
        &self,
        name: &str,
        expected: &Version,
        spec: EdgeDeviceSpec,
    ) -> Result<DeviceRecord, StoreError> {
        // A merge patch replaces lists whole, and the resourceVersion makes it conditional.
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": expected.0 },
            "spec": spec,
        });
        match self
            .devices
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(obj) => Ok(device_record(&obj)),
            Err(e) if is_status(&e, kube::core::Status::is_conflict) => Err(StoreError::Conflict {
                kind: "EdgeDevice",
                id: name.to_owned(),
                expected: expected.0.clone(),
            }),
            Err(e) => Err(api_error("EdgeDevice", name, e)),
        }
    }

    async fn enroll(&self, e: Enrollment) -> Result<EnrollOutcome, StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let (version, mut tokens) = self.join_tokens().await?;
            let now = Timestamp::now().as_second();
            let (spendable, spent_by_this_device) = match tokens.get(&e.token_hash) {
                None => (false, false),
                Some(t) => (
                    t.used_by.is_none() && t.expires_at > now,
                    t.used_by.as_deref() == Some(e.device_id.as_str()),
                ),
            };
            if !(spendable || spent_by_this_device) {
                return Ok(EnrollOutcome::InvalidToken);
            }
            if let Some(existing) = self.get_device(&e.device_id).await? {
                return Ok(super::reenrollment(&existing, &e.spec));
            }
            // Spend the token first: a crash after this leaves a token spent by this device, which
            // lets the same device finish enrolling on retry and nobody else.
            if spendable {
                if let Some(t) = tokens.get_mut(&e.token_hash) {
                    t.used_by = Some(e.device_id.clone());
                }
                match self.put_join_tokens(version, &tokens).await {
                    Ok(()) => {}
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(err) => return Err(err),
                }
            }
            let obj = EdgeDevice {
                metadata: ObjectMeta {
                    name: Some(e.device_id.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: e.spec.clone(),
                status: None,
            };
            return match self.devices.create(&PostParams::default(), &obj).await {
                Ok(o) => Ok(EnrollOutcome::Created(device_record(&o))),
                Err(err) if is_status(&err, kube::core::Status::is_already_exists) => {
                    match self.get_device(&e.device_id).await? {
                        Some(existing) => Ok(super::reenrollment(&existing, &e.spec)),
                        None => Err(StoreError::Backend(format!(
                            "EdgeDevice {} exists and does not",
                            e.device_id
                        ))),
                    }
                }
                Err(err) => Err(api_error("EdgeDevice", &e.device_id, err)),
            };
        }
        Err(StoreError::Backend(format!(
            "Secret {JOIN_TOKENS_SECRET}: kept changing; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }

    async fn add_join_token(
        &self,
        token_hash: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let (version, mut tokens) = self.join_tokens().await?;
            let rec = tokens
                .entry(token_hash.to_owned())
                .or_insert(JoinTokenRecord {
                    expires_at: expires_at.as_second(),
                    used_by: None,
                });
            if rec.used_by.is_some() {
                return Ok(());
            }
            rec.expires_at = expires_at.as_second();
            match self.put_join_tokens(version, &tokens).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Backend(format!(
            "Secret {JOIN_TOKENS_SECRET}: kept changing; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }

    async fn get_policy(&self) -> Result<Option<AgentPolicySpec>, StoreError> {
        let cached = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let policy = match cached {
            Some(p) => p,
            None => self
                .policies
                .get_opt(POLICY_NAME)
                .await
                .map_err(|e| api_error("AgentPolicy", POLICY_NAME, e))?
                .map(|p| p.spec),
        };
        Ok(policy.map(|mut p| {
            if p.models.is_empty() {
                p.models = self.default_tiers.clone();
            }
            p
        }))
    }

    async fn put_policy(&self, spec: AgentPolicySpec) -> Result<(), StoreError> {
        let apply = serde_json::json!({
            "apiVersion": AgentPolicy::api_version(&()),
            "kind": AgentPolicy::kind(&()),
            "metadata": { "name": POLICY_NAME },
            "spec": spec,
        });
        self.policies
            .patch(
                POLICY_NAME,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await
            .map_err(|e| api_error("AgentPolicy", POLICY_NAME, e))?;
        // Read-your-writes for this process; the watch confirms it shortly.
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(Some(spec));
        Ok(())
    }

    async fn trip_breaker(&self, trip: BreakerTrip) -> Result<bool, StoreError> {
        let err = |e| api_error("AgentPolicy", POLICY_NAME, e);
        let Some(policy) = self.policies.get_opt(POLICY_NAME).await.map_err(err)? else {
            return Ok(false);
        };
        if policy.spec.suspend {
            return Ok(false);
        }
        // Two writes (the status subresource and spec), each conditional on the version before
        // it: a policy edited meanwhile is read and decided again. The record goes first: if the
        // suspend then fails, the policy is still not suspended, so the next check trips again and
        // rewrites the record; the other order could leave a suspension nobody explains.
        let status = serde_json::json!({
            "metadata": { "resourceVersion": policy.resource_version() },
            // Conditions are empty here, so skipped: the merge patch leaves the operator's as they are.
            "status": AgentPolicyStatus { last_trip: Some(trip), ..Default::default() },
        });
        let recorded = self
            .policies
            .patch_status(POLICY_NAME, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(err)?;
        let suspend = serde_json::json!({
            "metadata": { "resourceVersion": recorded.resource_version() },
            "spec": { "suspend": true },
        });
        let patched = self
            .policies
            .patch(
                POLICY_NAME,
                &PatchParams::default(),
                &Patch::Merge(&suspend),
            )
            .await
            .map_err(err)?;
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(Some(patched.spec));
        Ok(true)
    }

    async fn policy_status(&self) -> Result<Option<AgentPolicyStatus>, StoreError> {
        Ok(self
            .policies
            .get_opt(POLICY_NAME)
            .await
            .map_err(|e| api_error("AgentPolicy", POLICY_NAME, e))?
            .map(|p| p.status.unwrap_or_default()))
    }

    fn changes(&self) -> broadcast::Receiver<TaskChanged> {
        // Subscribe before the watch starts, so its initial listing reaches this receiver.
        let rx = self.changes.subscribe();
        self.task_watch
            .get_or_init(|| tokio::spawn(watch_tasks(self.tasks.clone(), self.changes.clone())));
        rx
    }
}

impl KubeStore {
    /// Takes back a task this store just created but whose seq the window refused: it is denied
    /// (never run) rather than deleted, so nothing an API client saw disappears and the gateway needs
    /// no delete permission. A resubmission of it is answered `Existing` with the denial.
    async fn withdraw(&self, id: &str, seq: u64, refusal: SeqRefusal) {
        let last_seq = refusal.last_seq();
        let result = async {
            let task = self.get_task(id).await?.ok_or_else(|| StoreError::NotFound {
                kind: "AgentTask",
                id: id.to_owned(),
            })?;
            let status = AgentTaskStatus {
                phase: Some(TaskPhase::Denied),
                reason: Some(format!(
                    "replayed_seq: seq {seq} lost to a concurrent submission (device lastSeq {last_seq})"
                )),
                ..task.status.clone()
            };
            super::write_status(self, &task, status).await
        }
        .await;
        if let Err(e) = result {
            // The operator's reconcile would still admit it: say so loudly.
            tracing::error!(task = %id, error = %e, "could not deny a task that lost its seq race");
        }
    }
}

/// Builds an AgentTask object for a spec (tests and tools creating tasks around the gateway).
pub fn task_object(name: &str, namespace: &str, spec: AgentTaskSpec) -> AgentTask {
    AgentTask {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            finalizers: Some(vec![FINALIZER.to_owned()]),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_records_round_trip() {
        let r = JoinTokenRecord {
            expires_at: 10,
            used_by: Some("kiosk-1".into()),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"expiresAt":10,"usedBy":"kiosk-1"}"#);
        assert_eq!(serde_json::from_str::<JoinTokenRecord>(&s).unwrap(), r);
    }
}
