//! The `/v1` handlers.

use std::convert::Infallible;
use std::time::Duration;

use agentplane_api::device::{EdgeDeviceSpec, KeyAlgorithm, SEQ_WINDOW};
use agentplane_api::envelope::parse_public_key;
use agentplane_api::intent::check_dns_label;
use agentplane_api::task::{AgentTaskSpec, Approval, ApprovalDecision};
use agentplane_api::wire::{
    ApprovalList, ApprovalRequest, EnrollRequest, EnrollResponse, PendingApproval, SubmitResponse,
    TRACEPARENT_HEADER, TaskView,
};
use agentplane_api::{Envelope, TaskPhase};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header::CONTENT_TYPE};
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument as _;

use super::AppState;
use super::auth::{Principal, authenticate};
use super::error::ApiError;
use super::events::Update;
use crate::policy;
use crate::store::seq_window::SeqRefusal;
use crate::store::{Admission, EnrollOutcome, Enrollment, NewTask, TaskRecord, hash_secret};

/// Longest approval comment kept.
const MAX_COMMENT_BYTES: usize = 1024;

/// Checks the content type and turns body-read failures into JSON errors.
pub(crate) fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        ));
    }
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the request body is over the limit",
            )
        } else {
            ApiError::bad_request("unreadable_body", r.body_text())
        }
    })
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() {
            "invalid_request"
        } else {
            "malformed_json"
        };
        ApiError::bad_request(code, e.to_string())
    })
}

pub fn view(t: &TaskRecord) -> TaskView {
    TaskView {
        task_id: t.id.clone(),
        device_id: t.spec.device_ref.name.clone(),
        intent_type: t.spec.intent_type.clone(),
        phase: t.phase(),
        model: t.status.model.clone(),
        usage: t.status.usage,
        result: t.status.result.clone(),
        reason: t.status.reason.clone(),
        approval: t.status.approval.clone(),
        trace_id: t.status.trace_id.clone(),
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex trace id>-<16 hex span>-<2 hex flags>`).
fn trace_id_from(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(TRACEPARENT_HEADER)?.to_str().ok()?;
    let mut parts = v.split('-');
    let (version, trace) = (parts.next()?, parts.next()?);
    let ok = version.len() == 2
        && trace.len() == 32
        && trace
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && trace != "0".repeat(32);
    ok.then(|| trace.to_owned())
}

/// `POST /v1/intents`.
pub async fn submit_intent(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The gateway's hop of the trace begun at the edge: a child of the request's `traceparent`. The
    // kube store writes this span's context into the AgentTask's annotation at admission.
    let span = tracing::info_span!(
        "gateway.submit",
        otel.kind = "server",
        task = tracing::field::Empty
    );
    crate::telemetry::set_parent_from_headers(&span, &headers);
    match submit(&state, &headers, body).instrument(span).await {
        Ok((resp, outcome)) => {
            state
                .metrics
                .inc("agentplane_intents_total", &[("outcome", outcome)]);
            (StatusCode::ACCEPTED, Json(resp)).into_response()
        }
        Err(e) => {
            state
                .metrics
                .inc("agentplane_intents_total", &[("outcome", e.code)]);
            e.into_response()
        }
    }
}

async fn submit(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(SubmitResponse, &'static str), ApiError> {
    let bytes = json_body(headers, body)?;
    let envelope = Envelope::parse(&bytes)?;
    // Unverified: only used to find the device whose keys then verify the envelope.
    let claimed = envelope.peek_intent()?;
    let device = state
        .store
        .get_device(&claimed.device_id)
        .await?
        .ok_or_else(|| {
            ApiError::unauthorized(
                "unknown_device",
                format!("device {:?} is not registered", claimed.device_id),
            )
        })?;
    if device.spec.revoked {
        return Err(ApiError::forbidden(
            "device_revoked",
            format!("device {:?} is revoked", device.name),
        ));
    }
    let keys = device.spec.device_keys()?;
    let verified = envelope.verify(&device.name, &keys, jiff::Timestamp::now())?;
    let payload = verified.payload;
    tracing::Span::current().record("task", payload.task_id.as_str());
    // Rego refusals come before the task exists, so a denied intent leaves nothing behind; the
    // controller decides again (with the same modules) for tasks created around the gateway.
    let policy = state.store.get_policy().await?;
    let namespace = state.store.namespace();
    if let Some((code, why)) =
        policy::rego::admission_refusal(&state.rego, policy.as_ref(), namespace, &payload).await
    {
        // A retried submission of a task admitted under an earlier policy is still that task.
        let existing = state.store.get_task(&payload.task_id).await?;
        return match existing.filter(|t| t.spec.envelope.payload == envelope.payload) {
            Some(t) => Ok((duplicate(&t), "duplicate")),
            None => Err(ApiError::forbidden(code, why)),
        };
    }
    let spec = AgentTaskSpec::for_payload(envelope, &payload);
    // The edge's trace id; a request without one starts its trace here (at this span when traced).
    let trace_id = trace_id_from(headers)
        .or_else(|| crate::telemetry::trace_id_of(&tracing::Span::current()))
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let admission = state
        .store
        .admit(NewTask {
            id: payload.task_id.clone(),
            spec: spec.clone(),
            seq: payload.seq,
            trace_id: Some(trace_id),
        })
        .await?;
    match admission {
        Admission::Created(t) => {
            tracing::info!(task = %t.id, device = %device.name, seq = payload.seq, "intent accepted");
            Ok((
                SubmitResponse {
                    task_id: t.id.clone(),
                    phase: t.phase(),
                    duplicate: false,
                },
                "accepted",
            ))
        }
        Admission::Existing(t)
            if t.spec.envelope.payload == spec.envelope.payload
                && t.spec.device_ref == spec.device_ref =>
        {
            Ok((duplicate(&t), "duplicate"))
        }
        Admission::Existing(_) => Err(ApiError::conflict(
            "task_id_conflict",
            format!(
                "task id {:?} is already used by a different intent",
                payload.task_id
            ),
        )),
        Admission::SeqReplay(refusal) => Err(ApiError::conflict(
            "replayed_seq",
            replayed_seq_message(payload.seq, refusal),
        )),
    }
}

/// The answer to a resubmission of a task that exists.
fn duplicate(t: &TaskRecord) -> SubmitResponse {
    SubmitResponse {
        task_id: t.id.clone(),
        phase: t.phase(),
        duplicate: true,
    }
}

/// Why a new task id's seq was refused, and what the device can do about it.
fn replayed_seq_message(seq: u64, refusal: SeqRefusal) -> String {
    match refusal {
        SeqRefusal::Taken { last_seq } => format!(
            "seq {seq} is already used by another task of this device (its last accepted seq is {last_seq}); a device never signs two intents with one seq"
        ),
        SeqRefusal::BelowWindow { last_seq } => format!(
            "seq {seq} is at or below {} (the device's last accepted seq {last_seq} minus the replay window of {SEQ_WINDOW}); keep at most {SEQ_WINDOW} submissions in flight, in seq order",
            last_seq.saturating_sub(SEQ_WINDOW)
        ),
    }
}

/// Reads a task for `principal`: devices see only their own tasks; others' are reported as absent.
async fn task_for(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<TaskRecord, ApiError> {
    let not_found = || ApiError::not_found(format!("task {id:?} not found"));
    let task = state.store.get_task(id).await?.ok_or_else(not_found)?;
    match principal {
        Principal::Device(d) if *d != task.spec.device_ref.name => Err(not_found()),
        _ => Ok(task),
    }
}

/// `GET /v1/tasks/{id}`.
pub async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Json<TaskView>, ApiError> {
    let who = authenticate(&state, &method, &uri, &headers).await?;
    Ok(Json(view(&task_for(&state, &who, &id).await?)))
}

/// `GET /v1/tasks/{id}/events`: the task's view as a `phase` event now and on every change, until a
/// terminal phase (the stream then ends).
pub async fn task_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Sse<KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>, ApiError> {
    let who = authenticate(&state, &method, &uri, &headers).await?;
    // Watch before the first read, so a change between the two is not missed.
    let mut watch = state.events.watch(&id);
    let first = task_for(&state, &who, &id).await?;
    let permit = state
        .limits
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| super::overloaded("event streams"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let store = state.store.clone();
    let poll = state.config.sse_poll;
    tokio::spawn(async move {
        let _permit = permit; // held for the stream's life
        let mut last: Option<TaskView> = None;
        let mut current = Some(first);
        loop {
            if let Some(task) = current.take() {
                let v = view(&task);
                if last.as_ref() != Some(&v) {
                    let Ok(event) = Event::default().event("phase").json_data(&v) else {
                        return;
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return; // the client went away
                    }
                    last = Some(v);
                }
                if task.phase().is_terminal() {
                    return;
                }
            }
            // Wait for a change to this task (updates carry the record, in commit order), a
            // possible miss or the fallback poll (re-read), or the client leaving.
            tokio::select! {
                u = watch.updates.recv() => match u {
                    Some(Update::Changed(t)) => {
                        current = Some(TaskRecord::clone(&t));
                        continue;
                    }
                    Some(Update::Reread) => {}
                    None => return,
                },
                _ = tokio::time::sleep(poll) => {}
                _ = tx.closed() => return,
            }
            match store.get_task(&id).await {
                Ok(Some(t)) => current = Some(t),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "event stream read failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()))
}

/// `POST /v1/tasks/{id}/cancel` (signed by the task's device, or an approver).
pub async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    let who = authenticate(&state, &method, &uri, &headers).await?;
    let task = task_for(&state, &who, &id).await?;
    if task.phase().is_terminal() {
        return Err(ApiError::conflict(
            "already_terminal",
            format!("task is already {}", task.phase()),
        ));
    }
    let task = state.store.request_cancel(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&task))))
}

pub async fn approve(
    state: State<AppState>,
    id: Path<String>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TaskView>, ApiError> {
    decide(
        state,
        id,
        method,
        uri,
        headers,
        body,
        ApprovalDecision::Approved,
    )
    .await
}

pub async fn deny(
    state: State<AppState>,
    id: Path<String>,
    method: Method,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TaskView>, ApiError> {
    decide(
        state,
        id,
        method,
        uri,
        headers,
        body,
        ApprovalDecision::Denied,
    )
    .await
}

/// The caller, who must be an approver with a gateway credential and in the policy's `approvers`.
async fn approver_of(
    state: &AppState,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let who = authenticate(state, method, uri, headers).await?;
    let Principal::Approver(approver) = who else {
        return Err(ApiError::forbidden(
            "not_an_approver",
            "devices cannot approve tasks",
        ));
    };
    let policy = state.store.get_policy().await?.unwrap_or_default();
    if !policy::is_approver(&policy, &approver) {
        return Err(ApiError::forbidden(
            "not_an_approver",
            format!("{approver:?} is not an approver in the AgentPolicy"),
        ));
    }
    Ok(approver)
}

/// What an approver is asked to allow for a task waiting for a decision.
fn pending_approval(t: &TaskRecord) -> PendingApproval {
    let payload = t.spec.envelope.peek_intent().ok();
    // A plan waiting at a tool call; absent, the task-level approval its intent rule asks for.
    let call = t.status.pending_approval.as_ref();
    PendingApproval {
        task_id: t.id.clone(),
        device_id: t.spec.device_ref.name.clone(),
        user_id: t.spec.user_id.clone(),
        intent_type: t.spec.intent_type.clone(),
        prompt: payload.map(|p| p.intent.prompt).unwrap_or_default(),
        model: t.status.model.clone(),
        waiting_since: crate::store::admitted_at(&t.status).map(|at| at.to_string()),
        step: call.map(|c| c.step),
        server: call.map(|c| c.server.clone()),
        tool: call.map(|c| c.tool.clone()),
        arguments: call.map(|c| serde_json::Value::Object(c.arguments.clone())),
        args_digest: call.map(|c| c.args_digest.clone()),
    }
}

/// `GET /v1/approvals`: every task awaiting a decision, oldest first.
pub async fn list_approvals(
    State(state): State<AppState>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Json<ApprovalList>, ApiError> {
    approver_of(&state, &method, &uri, &headers).await?;
    let mut waiting: Vec<TaskRecord> = state
        .store
        .list_unfinished()
        .await?
        .into_iter()
        .filter(|t| t.phase() == TaskPhase::AwaitingApproval)
        .collect();
    waiting.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(Json(ApprovalList {
        pending: waiting.iter().map(pending_approval).collect(),
    }))
}

/// Records an approver's decision on a task in AwaitingApproval; the controller then moves it.
async fn decide(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    decision: ApprovalDecision,
) -> Result<Json<TaskView>, ApiError> {
    let approver = approver_of(&state, &method, &uri, &headers).await?;
    // The body is optional: an empty body means no comment.
    let has_body = body.as_ref().map(|b| !b.is_empty()).unwrap_or(true);
    let request: ApprovalRequest = if has_body {
        parse_json(&json_body(&headers, body)?)?
    } else {
        ApprovalRequest::default()
    };
    if request
        .comment
        .as_ref()
        .is_some_and(|c| c.len() > MAX_COMMENT_BYTES)
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("comment is over {MAX_COMMENT_BYTES} bytes"),
        ));
    }
    let task = state
        .store
        .get_task(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {id:?} not found")))?;
    // The controller moves the task out of AwaitingApproval in the write that accepts a decision,
    // so the phase alone says whether one is still wanted (`status.approval` is the record of an
    // accepted decision, perhaps of an earlier step, and is no signal here).
    if task.phase() != TaskPhase::AwaitingApproval {
        return Err(ApiError::conflict(
            "not_awaiting_approval",
            format!("task is {} and not awaiting a decision", task.phase()),
        ));
    }
    let pending = pending_approval(&task);
    if request.step != pending.step {
        return Err(ApiError::conflict(
            "step_mismatch",
            match (request.step, pending.step) {
                (Some(asked), None) => format!(
                    "the decision names step {asked}, but the task awaits a task-level approval"
                ),
                (None, Some(waiting)) => {
                    format!("the task awaits approval of step {waiting}; send --step {waiting}")
                }
                (asked, waiting) => format!(
                    "the decision names step {asked:?}, but the task waits at step {waiting:?}"
                ),
            },
        ));
    }
    if request.args_digest.is_some() && request.args_digest != pending.args_digest {
        return Err(ApiError::conflict(
            "args_mismatch",
            "the arguments you decided on are not the pending call's; list approvals again",
        ));
    }
    let approval = Approval {
        decision,
        approver: approver.clone(),
        decided_at: Time(jiff::Timestamp::now()),
        comment: request.comment.clone(),
        // The call decided on: the one just checked to be pending (same step, same digest).
        step: pending.step,
        args_digest: pending.args_digest.clone(),
    };
    // Recorded as its own object (never in the task's status): the controller re-checks it and
    // copies it into `status.approval` when it moves the task.
    let recorded = state.store.record_decision(&id, approval).await?;
    tracing::info!(task = %id, %approver, ?decision, record = %recorded.name, "decision recorded");
    // The view shows the decision as recorded; the task's own record follows once accepted.
    let mut answer = view(&task);
    answer.approval = Some(recorded.approval);
    Ok(Json(answer))
}

/// `POST /v1/devices/enroll`.
pub async fn enroll(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let result = enroll_inner(&state, &headers, body).await;
    let outcome = match &result {
        Ok((StatusCode::CREATED, _)) => "created",
        Ok(_) => "already_enrolled",
        Err(e) => e.code,
    };
    state
        .metrics
        .inc("agentplane_enrollments_total", &[("outcome", outcome)]);
    let (status, body) = result?;
    Ok((status, Json(body)).into_response())
}

async fn enroll_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, EnrollResponse), ApiError> {
    let req: EnrollRequest = parse_json(&json_body(headers, body)?)?;
    check_dns_label("deviceId", &req.device_id)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    if req.owner.trim().is_empty() || req.owner.len() > 253 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "owner must be 1 to 253 bytes",
        ));
    }
    let key = &req.public_key;
    if key.id.is_empty() || key.id.len() > 128 || key.alg != KeyAlgorithm::Ed25519 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "publicKey.id must be 1 to 128 bytes, alg ed25519",
        ));
    }
    parse_public_key(&key.id, &key.key)
        .map_err(|e| ApiError::bad_request("invalid_public_key", e.to_string()))?;
    if req.join_token.is_empty() || req.join_token.len() > 256 {
        return Err(ApiError::unauthorized(
            "invalid_join_token",
            "the join token is unknown, expired or spent",
        ));
    }
    let outcome = state
        .store
        .enroll(Enrollment {
            token_hash: hash_secret(&req.join_token),
            device_id: req.device_id.clone(),
            spec: EdgeDeviceSpec {
                public_keys: vec![req.public_key.clone()],
                owner: req.owner.clone(),
                allowed_intents: vec![],
                revoked: false,
            },
        })
        .await?;
    let namespace = state.store.namespace().to_owned();
    // The device applies this part of the policy itself (where regulated intents run); re-enrolling
    // hands it the current one.
    let edge_policy = state.store.get_policy().await?.and_then(|p| p.edge);
    match outcome {
        EnrollOutcome::Created(d) => {
            tracing::info!(device = %d.name, "device enrolled");
            Ok((
                StatusCode::CREATED,
                EnrollResponse {
                    device_id: d.name,
                    namespace,
                    already_enrolled: false,
                    last_seq: None,
                    edge_policy,
                },
            ))
        }
        EnrollOutcome::AlreadyEnrolled(d) => Ok((
            StatusCode::OK,
            EnrollResponse {
                device_id: d.name,
                namespace,
                already_enrolled: true,
                last_seq: d.status.last_seq,
                edge_policy,
            },
        )),
        EnrollOutcome::InvalidToken => Err(ApiError::unauthorized(
            "invalid_join_token",
            "the join token is unknown, expired or spent",
        )),
        EnrollOutcome::NameTaken => Err(ApiError::conflict(
            "device_exists",
            "a different device is enrolled under this name",
        )),
    }
}

pub async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    // A store round trip: healthy means able to serve, not just running.
    state.store.get_policy().await?;
    Ok(Json(serde_json::json!({ "status": "ok" })))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

pub async fn openapi() -> Json<serde_json::Value> {
    Json(super::openapi::document())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT_HEADER,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_id_from(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert(TRACEPARENT_HEADER, "garbage".parse().unwrap());
        assert_eq!(trace_id_from(&h), None);
        h.insert(
            TRACEPARENT_HEADER,
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id_from(&h), None);
    }
}
