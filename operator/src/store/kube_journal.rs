//! The distributed step journal: one `AgentTaskStep` object per step (see `agentplane_api::step`
//! for why one object per step rather than rows in the task's status).
//!
//! The journal's two rules hold through the API server's own guarantees:
//! - `begin` is a `create` of the step's deterministic name: of two attempts racing to begin a
//!   step, exactly one creates it; the other gets 409 AlreadyExists and reads the winner's row.
//! - `finish` and `await_approval` are read-modify-write replaces conditional on the
//!   resourceVersion read (a lost race is re-read and decided again), and the CRD's transition rule
//!   refuses any change to a finished step whoever sends it.
//!
//! Each step is owned by its AgentTask (owner reference), so deleting the task removes its steps.
//! The task's uid is read once per task and remembered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use agentplane_api::approval::{TASK_LABEL, TaskRef};
use agentplane_api::step::{
    AgentTaskStep, AgentTaskStepSpec, MAX_STEP_TEXT_BYTES, step_object_name,
};
use agentplane_api::task::{AgentTask, StepOutcome};
use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Resource as _};

use super::StoreError;
use super::journal::{Begun, JournalEntry, StepEnd, StepJournal};
use super::kubernetes::api_error;

/// How often a conditional write that keeps losing races is retried before giving up (each lost
/// race means another writer changed the step; the step is read again and decided again).
const CAS_ATTEMPTS: usize = 8;

const KIND: &str = "AgentTaskStep";

/// Task uids remembered at most (a long-running worker sees every task once; forgetting one only
/// costs a GET the next time its plan begins a step).
const MAX_REMEMBERED_UIDS: usize = 4096;

/// The journal over one namespace's `AgentTaskStep`s.
pub struct KubeJournal {
    steps: Api<AgentTaskStep>,
    tasks: Api<AgentTask>,
    /// Task name -> uid, for the owner reference (a task's uid never changes); bounded by
    /// [`MAX_REMEMBERED_UIDS`].
    uids: Mutex<HashMap<String, String>>,
}

impl KubeJournal {
    pub fn new(client: Client, namespace: &str) -> KubeJournal {
        KubeJournal {
            steps: Api::namespaced(client.clone(), namespace),
            tasks: Api::namespaced(client, namespace),
            uids: Mutex::default(),
        }
    }

    /// The owner reference to the task, reading its uid the first time.
    async fn owner(&self, task_id: &str) -> Result<OwnerReference, StoreError> {
        let cached = self
            .uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task_id)
            .cloned();
        let uid = match cached {
            Some(uid) => uid,
            None => {
                let task = self
                    .tasks
                    .get(task_id)
                    .await
                    .map_err(|e| api_error("AgentTask", task_id, e))?;
                let uid = task.metadata.uid.clone().ok_or_else(|| {
                    StoreError::Backend(format!("AgentTask {task_id} has no uid"))
                })?;
                let mut uids = self.uids.lock().unwrap_or_else(|p| p.into_inner());
                if uids.len() >= MAX_REMEMBERED_UIDS {
                    uids.clear();
                }
                uids.insert(task_id.to_owned(), uid.clone());
                uid
            }
        };
        Ok(OwnerReference {
            api_version: AgentTask::api_version(&()).into_owned(),
            kind: AgentTask::kind(&()).into_owned(),
            name: task_id.to_owned(),
            uid,
            // Not a blocker of the task's deletion: the steps are history, not work in progress.
            block_owner_deletion: None,
            controller: Some(true),
        })
    }

    /// Reads step `step` of `task_id`; `None` when it was never begun.
    async fn get(&self, task_id: &str, step: u32) -> Result<Option<AgentTaskStep>, StoreError> {
        let name = step_object_name(task_id, step);
        let obj = self
            .steps
            .get_opt(&name)
            .await
            .map_err(|e| api_error(KIND, &name, e))?;
        match obj {
            Some(o) if o.spec.task_ref.name != task_id || o.spec.step != step => {
                Err(StoreError::Backend(format!(
                    "{KIND} {name} belongs to step {} of task {:?}, not step {step} of {task_id:?}",
                    o.spec.step, o.spec.task_ref.name
                )))
            }
            other => Ok(other),
        }
    }

    /// Replaces `obj` as changed by `change`, conditional on the version read; re-reads and asks
    /// `change` again on a lost race. `change` returns `false` to leave the step as it is.
    async fn update(
        &self,
        task_id: &str,
        step: u32,
        change: impl Fn(&mut AgentTaskStepSpec) -> bool,
    ) -> Result<bool, StoreError> {
        let name = step_object_name(task_id, step);
        for _ in 0..CAS_ATTEMPTS {
            let Some(mut obj) = self.get(task_id, step).await? else {
                return Err(StoreError::NotFound {
                    kind: KIND,
                    id: name,
                });
            };
            if !change(&mut obj.spec) {
                return Ok(false);
            }
            check_size(&name, &obj.spec)?;
            match self
                .steps
                .replace(&name, &PostParams::default(), &obj)
                .await
            {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(api_error(KIND, &name, e)),
            }
        }
        Err(StoreError::Conflict {
            kind: KIND,
            id: name,
            expected: format!("a write within {CAS_ATTEMPTS} attempts"),
        })
    }
}

/// Refuses, with the reason, a step whose texts would not fit one object (etcd's request limit);
/// the plan loop keeps tool results under [`MAX_STEP_TEXT_BYTES`] before they get here.
fn check_size(name: &str, spec: &AgentTaskStepSpec) -> Result<(), StoreError> {
    let payload = spec
        .payload
        .as_ref()
        .map(|p| {
            serde_json::to_string(p)
                .map(|s| s.len())
                .unwrap_or(usize::MAX)
        })
        .unwrap_or(0);
    let total = payload.saturating_add(spec.result.as_ref().map_or(0, String::len));
    if total > MAX_STEP_TEXT_BYTES {
        return Err(StoreError::Backend(format!(
            "{KIND} {name}: {total} bytes of payload and result, more than the \
             {MAX_STEP_TEXT_BYTES} one step object holds"
        )));
    }
    Ok(())
}

fn spec_of(entry: &JournalEntry) -> AgentTaskStepSpec {
    AgentTaskStepSpec {
        task_ref: TaskRef {
            name: entry.task_id.clone(),
        },
        step: entry.step,
        kind: entry.kind,
        name: entry.name.clone(),
        call_id: entry.call_id.clone(),
        payload: match &entry.payload {
            serde_json::Value::Object(m) => Some(m.clone()),
            _ => None,
        },
        args_digest: entry.args_digest.clone(),
        outcome: entry.outcome,
        result: entry.result.clone(),
        input_tokens: entry.input_tokens,
        output_tokens: entry.output_tokens,
        cost_micros: entry.cost_micros,
        started_at: Time(entry.started_at),
        finished_at: entry.finished_at.map(Time),
        error: entry.error.clone(),
    }
}

fn entry_of(obj: &AgentTaskStep) -> JournalEntry {
    let s = &obj.spec;
    JournalEntry {
        task_id: s.task_ref.name.clone(),
        step: s.step,
        kind: s.kind,
        name: s.name.clone(),
        call_id: s.call_id.clone(),
        payload: s
            .payload
            .clone()
            .map(serde_json::Value::Object)
            .unwrap_or(serde_json::Value::Null),
        args_digest: s.args_digest.clone(),
        outcome: s.outcome,
        result: s.result.clone(),
        input_tokens: s.input_tokens,
        output_tokens: s.output_tokens,
        cost_micros: s.cost_micros,
        started_at: s.started_at.0,
        finished_at: s.finished_at.as_ref().map(|t| t.0),
        error: s.error.clone(),
    }
}

#[async_trait]
impl StepJournal for KubeJournal {
    async fn begin(&self, entry: &JournalEntry) -> Result<Begun, StoreError> {
        let name = step_object_name(&entry.task_id, entry.step);
        let mut spec = spec_of(entry);
        spec.outcome = StepOutcome::Pending;
        check_size(&name, &spec)?;
        let obj = AgentTaskStep {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    TASK_LABEL.to_owned(),
                    entry.task_id.clone(),
                )])),
                owner_references: Some(vec![self.owner(&entry.task_id).await?]),
                ..Default::default()
            },
            spec,
        };
        match self.steps.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(Begun::Started),
            // Begun before (a resume, or another attempt won the race): its row is the truth.
            Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" || s.code == 409 => {
                match self.get(&entry.task_id, entry.step).await? {
                    Some(existing) => Ok(Begun::Existing(Box::new(entry_of(&existing)))),
                    None => Err(StoreError::Backend(format!(
                        "{KIND} {name} already exists but cannot be read"
                    ))),
                }
            }
            Err(e) => Err(api_error(KIND, &name, e)),
        }
    }

    async fn finish(&self, task_id: &str, step: u32, end: StepEnd) -> Result<bool, StoreError> {
        let finished_at = Timestamp::now();
        self.update(task_id, step, |spec| {
            if spec.outcome.is_finished() {
                return false;
            }
            spec.outcome = end.outcome;
            if let Some(serde_json::Value::Object(p)) = &end.payload {
                spec.payload = Some(p.clone());
            }
            spec.result = end.result.clone();
            spec.input_tokens = end.input_tokens;
            spec.output_tokens = end.output_tokens;
            spec.cost_micros = end.cost_micros;
            spec.finished_at = Some(Time(finished_at));
            spec.error = end.error.clone();
            true
        })
        .await
    }

    async fn await_approval(&self, task_id: &str, step: u32) -> Result<(), StoreError> {
        self.update(task_id, step, |spec| {
            if spec.outcome != StepOutcome::Pending {
                return false;
            }
            spec.outcome = StepOutcome::AwaitingApproval;
            true
        })
        .await
        .map(|_| ())
    }

    async fn steps(&self, task_id: &str) -> Result<Vec<JournalEntry>, StoreError> {
        let params = ListParams::default().labels(&format!("{TASK_LABEL}={task_id}"));
        let list = self
            .steps
            .list(&params)
            .await
            .map_err(|e| api_error(KIND, task_id, e))?;
        // The label is an index; the spec says which task a step belongs to.
        let mut out: Vec<JournalEntry> = list
            .items
            .iter()
            .filter(|s| s.spec.task_ref.name == task_id)
            .map(entry_of)
            .collect();
        out.sort_by_key(|e| e.step);
        Ok(out)
    }

    fn max_text_bytes(&self) -> Option<usize> {
        Some(MAX_STEP_TEXT_BYTES)
    }
}
