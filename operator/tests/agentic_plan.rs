//! The plan loop end to end in the embedded runtime: a task whose intent allows tools runs model turn
//! -> MCP tool calls -> model turn ... with every step journaled, gated and shown in its status.
//!
//! Tool servers are real: `@modelcontextprotocol/server-everything` (peer `mcp-everything`) and
//! `ci/mcp/recorder.py`, a server written with the Python MCP SDK (peer `mcp-python`) that appends
//! every call it receives, with the idempotency key from `_meta`, to a file the tests read.
//!
//! No LLM runs on this machine, so the model endpoint is a scripted HTTP server (`scripted_model`)
//! that speaks the exact wire formats of OpenAI chat completions and Anthropic Messages tool calls;
//! which one a test uses is chosen by the tier's endpoint kind, and both are used below.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod mcp_peers;
mod scripted_model;

use agentplane::audit::EventKind;
use agentplane::client::DeviceIdentity;
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::store::journal::{SqliteJournal, StepJournal};
use agentplane::store::sqlite::{Db, SqliteStore};
use agentplane::store::{Admission, NewTask, TaskRecord, TaskStore};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use agentplane_api::device::EdgeDeviceSpec;
use agentplane_api::policy::{
    AgentPolicySpec, DEFAULT_REGO_QUERY, EndpointKind, HttpTransport, McpServer, RegoModule,
    RegoPolicy, ToolRule,
};
use agentplane_api::task::{AgentTaskSpec, Approval, ApprovalDecision, StepKind, StepOutcome};
use mcp_peers::{
    assert_gone, everything, http_everything, python, recorded, recorder_server, script, server,
    tool, wait_for_calls,
};
use scripted_model::{
    ModelServer, Scripted, assert_three_records_once, plan_policy, three_records, tool_results,
};
use serde_json::{Value, json};

const INTENT: &str = "agent";

// ---------------------------------------------------------------------------------------------
// Tool servers and the policy.

fn policy(
    kind: EndpointKind,
    base: &str,
    servers: Vec<McpServer>,
    tools: Vec<ToolRule>,
) -> AgentPolicySpec {
    plan_policy(default_policy(), INTENT, kind, base, servers, tools)
}

// ---------------------------------------------------------------------------------------------
// The runtime.

fn device_spec(device: &DeviceIdentity) -> EdgeDeviceSpec {
    EdgeDeviceSpec {
        public_keys: vec![device.public_key()],
        owner: "o".into(),
        allowed_intents: vec![],
        revoked: false,
    }
}

async fn start(dir: &Path, policy: AgentPolicySpec) -> (Embedded, DeviceIdentity) {
    scripted_model::write_key(dir);
    let rt = Embedded::start(EmbeddedConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        join_tokens: vec!["join".into()],
        resync: Duration::from_millis(200),
        worker: WorkerConfig {
            retry_delay: Duration::from_millis(100),
            wait: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
        initial_policy: Some(policy),
        ..EmbeddedConfig::default()
    })
    .await
    .unwrap();
    let device = DeviceIdentity::generate("kiosk-1").unwrap();
    rt.store
        .put_device("kiosk-1", device_spec(&device))
        .await
        .unwrap();
    (rt, device)
}

async fn submit(store: &dyn TaskStore, device: &DeviceIdentity, seq: u64, prompt: &str) -> String {
    let payload = device.intent(seq, INTENT, prompt);
    let spec = AgentTaskSpec::for_payload(device.sign(&payload).unwrap(), &payload);
    let Admission::Created(rec) = store
        .admit(NewTask {
            id: payload.task_id.clone(),
            spec,
            seq,
            trace_id: None,
        })
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    rec.id
}

/// Waits until `done` holds for the task (at most `secs` seconds).
async fn wait_for(
    store: &dyn TaskStore,
    id: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&TaskRecord) -> bool,
) -> TaskRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let t = store.get_task(id).await.unwrap().unwrap();
        if done(&t) {
            return t;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "task {id}: {what} did not happen; phase {} reason {:?} steps {:?}",
                t.phase(),
                t.status.reason,
                t.status.steps
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finished(store: &dyn TaskStore, id: &str) -> TaskRecord {
    wait_for(store, id, 60, "a terminal phase", |t| {
        t.phase().is_terminal()
    })
    .await
}

/// A runtime whose policy offers recorder tools to the `agent` intent, with a scripted model.
struct Fixture {
    model: ModelServer,
    log: PathBuf,
    rt: Embedded,
    device: DeviceIdentity,
    policy: AgentPolicySpec,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn recorder(
        kind: EndpointKind,
        script: Vec<Scripted>,
        tools: Vec<ToolRule>,
        max_steps: Option<u32>,
    ) -> Fixture {
        Fixture::recorder_with(kind, script, tools, |p| p.max_steps = max_steps).await
    }

    /// As [`Fixture::recorder`], with the policy edited by `edit` before the runtime starts.
    async fn recorder_with(
        kind: EndpointKind,
        script: Vec<Scripted>,
        tools: Vec<ToolRule>,
        edit: impl FnOnce(&mut AgentPolicySpec),
    ) -> Fixture {
        let model = ModelServer::start(script).await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.jsonl");
        let mut policy = policy(kind, &model.base, vec![recorder_server(&log)], tools);
        edit(&mut policy);
        let (rt, device) = start(dir.path(), policy.clone()).await;
        Fixture {
            model,
            log,
            rt,
            device,
            policy,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.rt.stop().await;
    }

    async fn submit(&self, seq: u64, prompt: &str) -> String {
        submit(&*self.rt.store, &self.device, seq, prompt).await
    }

    async fn finished(&self, id: &str) -> TaskRecord {
        finished(&*self.rt.store, id).await
    }

    /// The approval plan, submitted and parked at its destructive step.
    async fn parked(kind: EndpointKind) -> (Fixture, TaskRecord) {
        let script = vec![
            Scripted::Calls(vec![(
                "rec__write_record",
                json!({"key": "a", "value": "1"}),
            )]),
            Scripted::Calls(vec![("rec__delete_record", json!({"key": "a"}))]),
            Scripted::Answer,
        ];
        let tools = vec![
            tool("rec", "write_record", false),
            tool("rec", "delete_record", true),
        ];
        let f = Fixture::recorder(kind, script, tools, None).await;
        let id = f.submit(1, "write then delete").await;
        let parked = wait_for(&*f.rt.store, &id, 60, "AwaitingApproval", |t| {
            t.phase() == TaskPhase::AwaitingApproval || t.phase().is_terminal()
        })
        .await;
        assert_eq!(
            parked.phase(),
            TaskPhase::AwaitingApproval,
            "{:?}",
            parked.status.reason
        );
        (f, parked)
    }
}

/// Runs one task on a runtime whose policy offers server-everything's `get-sum` and `echo` (reached
/// through `everything`) on the scripted model speaking `kind`; it must succeed.
async fn run_everything_plan(
    dir: &Path,
    kind: EndpointKind,
    model: &ModelServer,
    everything: McpServer,
    prompt: &str,
) -> (Embedded, String, TaskRecord) {
    let p = policy(
        kind,
        &model.base,
        vec![everything],
        vec![
            tool("everything", "get-sum", false),
            tool("everything", "echo", false),
        ],
    );
    let (rt, device) = start(dir, p).await;
    let id = submit(&*rt.store, &device, 1, prompt).await;
    let t = finished(&*rt.store, &id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    (rt, id, t)
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_tool_plan_over_server_everything_succeeds_with_the_results_in_the_answer() {
    // OpenAI wire format; two calls in the first turn, one in the second.
    let model = ModelServer::start(vec![
        Scripted::Calls(vec![
            ("everything__get-sum", json!({"a": 2, "b": 40})),
            ("everything__echo", json!({"message": "hello plan"})),
        ]),
        Scripted::Calls(vec![(
            "everything__echo",
            json!({"message": "second turn"}),
        )]),
        Scripted::Answer,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let everything_stdio = server("everything", everything(), vec!["stdio".into()]);
    let (rt, id, t) = run_everything_plan(
        dir.path(),
        EndpointKind::Openai,
        &model,
        everything_stdio,
        "add and echo",
    )
    .await;
    let answer = t.status.result.clone().unwrap();
    assert!(
        answer.contains("42") && answer.contains("hello plan") && answer.contains("second turn"),
        "{answer}"
    );
    // model, tool, tool, model, tool, model.
    let kinds: Vec<(u32, StepKind, &str, StepOutcome)> = t
        .status
        .steps
        .iter()
        .map(|s| (s.index, s.kind, s.name.as_str(), s.outcome))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, StepKind::Model, "scripted", StepOutcome::Done),
            (2, StepKind::Tool, "everything/get-sum", StepOutcome::Done),
            (3, StepKind::Tool, "everything/echo", StepOutcome::Done),
            (4, StepKind::Model, "scripted", StepOutcome::Done),
            (5, StepKind::Tool, "everything/echo", StepOutcome::Done),
            (6, StepKind::Model, "scripted", StepOutcome::Done),
        ]
    );
    let sum_args = json!({"a": 2, "b": 40});
    assert_eq!(
        t.status.steps[1].args_digest.as_deref(),
        Some(agentplane_api::task::args_digest(sum_args.as_object().unwrap()).as_str())
    );
    // Every model turn counts: 3 turns x (10 in, 5 out), at 1000/2000 micros per 1k tokens.
    let usage = t.status.usage.unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens), (30, 15));
    assert_eq!(usage.cost_micros, 3 * (10 + 10));
    assert!(
        t.status
            .steps
            .iter()
            .filter(|s| s.kind == StepKind::Model)
            .all(|s| s.cost_micros == 20)
    );
    // The endpoint was offered exactly the allowed tools, and asked once per turn, each under its
    // step's key.
    let seen = model.seen();
    assert_eq!(seen.len(), 3);
    let offered: Vec<&str> = seen[0].2["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered.len(), 2, "{offered:?}");
    assert!(offered.contains(&"everything__get-sum") && offered.contains(&"everything__echo"));
    let keys: Vec<&str> = seen.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            format!("{id}/model/1"),
            format!("{id}/model/4"),
            format!("{id}/model/6")
        ]
    );
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_tool_plan_over_streamable_http_succeeds_with_the_results_in_the_answer() {
    // Anthropic wire format; the same server as the stdio plan, reached over streamable HTTP.
    let (_server, port) = http_everything().await;
    let model = ModelServer::start(vec![
        Scripted::Calls(vec![
            ("everything__get-sum", json!({"a": 20, "b": 22})),
            ("everything__echo", json!({"message": "over http"})),
        ]),
        Scripted::Calls(vec![("everything__echo", json!({"message": "turn two"}))]),
        Scripted::Answer,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut everything_http = server("everything", String::new(), vec![]);
    everything_http.stdio = None;
    everything_http.http = Some(HttpTransport {
        url: format!("http://127.0.0.1:{port}/mcp"),
        headers: vec![],
    });
    let (rt, _id, t) = run_everything_plan(
        dir.path(),
        EndpointKind::Anthropic,
        &model,
        everything_http,
        "add and echo over http",
    )
    .await;
    let answer = t.status.result.clone().unwrap();
    assert!(
        answer.contains("42") && answer.contains("over http") && answer.contains("turn two"),
        "{answer}"
    );
    let tools: Vec<(&str, StepOutcome)> = t
        .status
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Tool)
        .map(|s| (s.name.as_str(), s.outcome))
        .collect();
    assert_eq!(
        tools,
        vec![
            ("everything/get-sum", StepOutcome::Done),
            ("everything/echo", StepOutcome::Done),
            ("everything/echo", StepOutcome::Done),
        ]
    );
    // Anthropic's tool_result blocks carried the results back, one per tool_use.
    let seen = model.seen();
    assert_eq!(seen.len(), 3);
    let second = tool_results(&seen[1].2);
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(
        second[0].contains("42") && second[1].contains("over http"),
        "{second:?}"
    );
    assert_eq!(tool_results(&seen[2].2).len(), 3);
    rt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_tool_plan_over_the_recorder_calls_each_tool_once_with_its_step_key() {
    // Anthropic wire format.
    let f = Fixture::recorder(
        EndpointKind::Anthropic,
        three_records(),
        vec![tool("rec", "write_record", false)],
        None,
    )
    .await;
    let (model, log) = (&f.model, &f.log);
    let id = f.submit(1, "write three records").await;
    let t = f.finished(&id).await;
    assert_three_records_once(&t, log);
    // The Anthropic requests carried the results back as tool_result blocks.
    let last = &model.seen()[3].2;
    assert_eq!(last["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(
        last["messages"][2]["content"][0]["tool_use_id"],
        "toolu_0_0"
    );
    assert_eq!(t.status.steps.len(), 7);
    assert_eq!(t.status.usage.unwrap().input_tokens, 40);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_not_on_the_allow_list_is_never_offered_nor_called() {
    // OpenAI format. The model asks for the destructive tool, which this intent does not allow.
    let f = Fixture::recorder(
        EndpointKind::Openai,
        vec![
            Scripted::Calls(vec![
                ("rec__delete_record", json!({"key": "a"})),
                ("rec__write_record", json!({"key": "a", "value": "1"})),
            ]),
            Scripted::Answer,
        ],
        vec![tool("rec", "write_record", false)],
        None,
    )
    .await;
    let (model, log) = (&f.model, &f.log);
    let id = f.submit(1, "try to delete").await;
    let t = f.finished(&id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    let calls = recorded(log);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].tool, "write_record");
    let offered: Vec<String> = model.seen()[0].2["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(offered, vec!["rec__write_record"]);
    // The refusal went back to the model as an error result (OpenAI has no flag: "error: ...").
    let answer = t.status.result.unwrap();
    assert!(
        answer.contains("error: tool rec/delete_record is not allowed")
            && answer.contains("stored a=1"),
        "{answer}"
    );
    assert_eq!(t.status.steps[1].outcome, StepOutcome::Denied);
    assert!(
        t.status.steps[1]
            .error
            .as_deref()
            .unwrap()
            .contains("not allowed"),
        "{:?}",
        t.status.steps[1]
    );
    f.stop().await;
}

/// Refuses writes of the key "vault" and wants a person to look at any delete.
const TOOL_REGO: &str = r#"package agentplane

import rego.v1

default decision := {"allow": true}

decision := {"allow": false, "reasons": ["the vault key is read-only"]} if {
	input.kind == "tool_call"
	input.tool.name == "write_record"
	input.tool.arguments.key == "vault"
}

decision := {"allow": true, "require_approval": true, "reasons": ["deletes are reviewed"]} if {
	input.kind == "tool_call"
	input.tool.name == "delete_record"
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rego_policy_decides_each_tool_call_after_the_allow_list() {
    // Anthropic format. Both tools are on the allow-list and neither needs approval by rule: the
    // Rego module refuses one call by its arguments and parks the delete.
    let f = Fixture::recorder_with(
        EndpointKind::Anthropic,
        vec![
            Scripted::Calls(vec![
                ("rec__write_record", json!({"key": "vault", "value": "x"})),
                ("rec__write_record", json!({"key": "a", "value": "1"})),
            ]),
            Scripted::Calls(vec![("rec__delete_record", json!({"key": "a"}))]),
            Scripted::Answer,
        ],
        vec![
            tool("rec", "write_record", false),
            tool("rec", "delete_record", false),
        ],
        |p| {
            p.rego = Some(RegoPolicy {
                modules: vec![RegoModule {
                    name: "tools.rego".into(),
                    inline: Some(TOOL_REGO.into()),
                    config_map_ref: None,
                }],
                query: DEFAULT_REGO_QUERY.into(),
            })
        },
    )
    .await;
    let id = f.submit(1, "write twice, then delete").await;
    let parked = wait_for(&*f.rt.store, &id, 60, "AwaitingApproval", |t| {
        t.phase() == TaskPhase::AwaitingApproval || t.phase().is_terminal()
    })
    .await;
    assert_eq!(
        parked.phase(),
        TaskPhase::AwaitingApproval,
        "{:?}",
        parked.status.reason
    );
    let pending = parked.status.pending_approval.clone().unwrap();
    assert_eq!(pending.tool, "delete_record");
    // The refused write never reached the server; the allowed one did, once.
    let calls = recorded(&f.log);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].arguments["key"], "a");
    let refused = &parked.status.steps[1];
    assert_eq!(refused.outcome, StepOutcome::Denied, "{refused:?}");
    let why = refused.error.as_deref().unwrap();
    assert!(
        why.contains("denied by Rego policy sha256:") && why.contains("the vault key is read-only"),
        "{why}"
    );
    decide(&*f.rt.store, &parked, ApprovalDecision::Approved).await;
    let t = f.finished(&id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    let calls = recorded(&f.log);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].tool, "delete_record");
    // The refusal went back to the model as an error result.
    assert!(
        t.status
            .result
            .unwrap()
            .contains("the vault key is read-only"),
        "the model was not told why"
    );
    // The refusal is a `decision` leaf in the audit log, naming the step, the Rego digest and why.
    let log =
        f.rt.audit
            .clone()
            .expect("the embedded runtime keeps an audit log");
    let mut refusals = Vec::new();
    for seq in 0..log.size().await.unwrap() {
        let e = log.leaf(seq).await.unwrap().unwrap().event().unwrap();
        if e.kind == EventKind::Decision && e.details["step"].is_u64() {
            refusals.push(e);
        }
    }
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let leaf = &refusals[0];
    assert_eq!(leaf.task, id);
    assert_eq!(leaf.details["step"], 2);
    assert_eq!(leaf.details["tool"], "rec/write_record");
    let why = leaf.reason.as_deref().unwrap();
    assert!(
        why.contains("denied by Rego policy sha256:") && why.contains("read-only"),
        "{why}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_steps_exceeded_fails_the_task_with_the_reason() {
    // Anthropic format; the model never stops calling tools.
    let f = Fixture::recorder(
        EndpointKind::Anthropic,
        vec![Scripted::Calls(vec![(
            "rec__write_record",
            json!({"key": "loop", "value": "x"}),
        )])],
        vec![tool("rec", "write_record", false)],
        Some(3),
    )
    .await;
    let log = &f.log;
    let id = f.submit(1, "loop forever").await;
    let t = f.finished(&id).await;
    assert_eq!(t.phase(), TaskPhase::Failed);
    let reason = t.status.reason.clone().unwrap();
    assert!(reason.contains("maxSteps (3)"), "{reason}");
    // Steps 1-3 ran (model, tool, model); step 4 never began.
    assert_eq!(t.status.steps.len(), 3, "{:?}", t.status.steps);
    assert_eq!(recorded(log).len(), 1);
    assert_eq!(t.status.usage.unwrap().input_tokens, 20);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_server_that_cannot_run_fails_the_attempts_and_then_the_task_with_the_reason() {
    let model = ModelServer::start(vec![
        Scripted::Calls(vec![("gone__anything", json!({}))]),
        Scripted::Answer,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-mcp-server");
    let p = policy(
        EndpointKind::Openai,
        &model.base,
        vec![server(
            "gone",
            missing.to_string_lossy().into_owned(),
            vec![],
        )],
        vec![tool("gone", "anything", false)],
    );
    let (rt, device) = start(dir.path(), p).await;
    let id = submit(&*rt.store, &device, 1, "use a broken server").await;
    let t = finished(&*rt.store, &id).await;
    assert_eq!(t.phase(), TaskPhase::Failed);
    let reason = t.status.reason.clone().unwrap();
    assert!(
        reason.contains("dead-letter") && reason.contains("MCP server gone: could not connect"),
        "{reason}"
    );
    assert!(model.seen().is_empty(), "no model turn without the tools");
    rt.stop().await;
}

/// `ci/mcp/misbehave.py MODE` over stdio (the Python SDK's server, misbehaving on purpose).
fn misbehaving_server(mode: &str) -> McpServer {
    server("bad", python(), vec![script("misbehave.py"), mode.into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_garbage_fails_the_task_at_once_and_an_oversized_result_goes_to_the_model()
 {
    // Malformed JSON-RPC fails the same way every time: the task fails on the first attempt with
    // the protocol error (no redelivery, no dead-letter queue), and no model turn runs.
    let model = ModelServer::start(vec![Scripted::Answer]).await;
    let dir = tempfile::tempdir().unwrap();
    let p = policy(
        EndpointKind::Openai,
        &model.base,
        vec![misbehaving_server("garbage")],
        vec![tool("bad", "echo", false)],
    );
    let (rt, device) = start(dir.path(), p).await;
    let id = submit(&*rt.store, &device, 1, "list a broken server").await;
    let t = finished(&*rt.store, &id).await;
    assert_eq!(t.phase(), TaskPhase::Failed, "{:?}", t.status.reason);
    let reason = t.status.reason.clone().unwrap();
    assert!(
        reason.contains("MCP server bad: tools/list failed") && !reason.contains("dead-letter"),
        "{reason}"
    );
    assert!(model.seen().is_empty(), "no model turn without the tools");
    rt.stop().await;

    // A result over maxResultBytes (1 MiB by default; the tool sends 2 MB) is an error result for
    // the model, and the plan goes on to its answer (Anthropic format).
    let model = ModelServer::start(vec![
        Scripted::Calls(vec![("bad__huge", json!({"megabytes": 2}))]),
        Scripted::Answer,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let p = policy(
        EndpointKind::Anthropic,
        &model.base,
        vec![misbehaving_server("tools")],
        vec![tool("bad", "huge", false)],
    );
    let (rt, device) = start(dir.path(), p).await;
    let id = submit(&*rt.store, &device, 1, "ask for too much").await;
    let t = finished(&*rt.store, &id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    let step = &t.status.steps[1];
    assert_eq!(step.outcome, StepOutcome::Failed, "{step:?}");
    assert!(
        step.error
            .as_deref()
            .unwrap()
            .contains("over the 1048576-byte limit"),
        "{step:?}"
    );
    assert!(
        t.status
            .result
            .unwrap()
            .contains("over the 1048576-byte limit"),
        "the model was not told"
    );
    rt.stop().await;
}

/// Writes an approver's decision on the pending call, as the gateway records it.
async fn decide(store: &dyn TaskStore, t: &TaskRecord, decision: ApprovalDecision) {
    // Recorded as the gateway records an approver's decision; the controller judges it and copies
    // it into `status.approval` (nobody else writes that).
    let pending = t.status.pending_approval.clone().unwrap();
    let approval = Approval {
        decision,
        approver: "admin".into(),
        decided_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        comment: None,
        step: Some(pending.step),
        args_digest: Some(pending.args_digest),
    };
    store.record_decision(&t.id, approval).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destructive_tool_waits_for_approval_and_runs_with_the_approved_arguments() {
    let (f, parked) = Fixture::parked(EndpointKind::Openai).await;
    let (model, log, rt, id) = (&f.model, &f.log, &f.rt, parked.id.clone());
    let pending = parked.status.pending_approval.clone().unwrap();
    assert_eq!(
        (pending.step, pending.server.as_str(), pending.tool.as_str()),
        (4, "rec", "delete_record")
    );
    assert_eq!(
        Value::Object(pending.arguments.clone()),
        json!({"key": "a"})
    );
    assert_eq!(
        parked.status.steps[3].outcome,
        StepOutcome::AwaitingApproval
    );
    // Nothing destructive happened while waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = recorded(log);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].tool, "write_record");

    // Every status the task goes through from the approval on.
    let mut changes = rt.store.changes();
    decide(&*rt.store, &parked, ApprovalDecision::Approved).await;
    let t = finished(&*rt.store, &id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    let mut seen = Vec::new();
    while let Ok(ev) = changes.try_recv() {
        if ev.id == id {
            seen.push((ev.phase, ev.task.status.reason.clone()));
        }
    }
    // Once approved, no status still says the step waits; the re-queue names the approval.
    assert!(
        seen.iter()
            .all(|(phase, reason)| *phase == TaskPhase::AwaitingApproval
                || !reason
                    .as_deref()
                    .unwrap_or("")
                    .contains("waits for an approver")),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(
            TaskPhase::Queued,
            Some("step 4 (rec/delete_record) approved by admin".into())
        )),
        "{seen:?}"
    );
    let calls = recorded(log);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].tool, "delete_record");
    assert_eq!(calls[1].arguments, json!({"key": "a"}));
    assert_eq!(calls[1].key, format!("{id}/tool/4"));
    assert!(t.status.pending_approval.is_none());
    assert_eq!(t.status.approval.unwrap().step, Some(4));
    // The model step before the approval was not asked again: 3 turns in all.
    assert_eq!(model.seen().len(), 3);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_step_ends_the_task_denied_naming_the_step() {
    let (f, parked) = Fixture::parked(EndpointKind::Anthropic).await;
    let (log, rt, id) = (&f.log, &f.rt, parked.id.clone());
    decide(&*rt.store, &parked, ApprovalDecision::Denied).await;
    let t = finished(&*rt.store, &id).await;
    assert_eq!(t.phase(), TaskPhase::Denied);
    let reason = t.status.reason.unwrap();
    assert!(reason.contains("at step 4 (rec/delete_record)"), "{reason}");
    let calls = recorded(log);
    assert!(calls.iter().all(|c| c.tool != "delete_record"), "{calls:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_stops_a_running_plan_before_its_next_step_and_cancel_ends_it() {
    // Five slow writes, one per turn (OpenAI format).
    let mut script: Vec<Scripted> = (0..5)
        .map(|i| {
            Scripted::Calls(vec![(
                "rec__slow_write",
                json!({"key": format!("k{i}"), "value": "v", "seconds": 0.3}),
            )])
        })
        .collect();
    script.push(Scripted::Answer);
    let f = Fixture::recorder(
        EndpointKind::Openai,
        script,
        vec![tool("rec", "slow_write", false)],
        None,
    )
    .await;
    let (log, rt, p) = (&f.log, &f.rt, f.policy.clone());
    let id = f.submit(1, "five slow writes").await;
    wait_for_calls(log, 2).await;
    let mut suspended = p.clone();
    suspended.suspend = true;
    rt.store.put_policy(suspended).await.unwrap();
    let t = wait_for(&*rt.store, &id, 30, "hand-back on suspend", |t| {
        t.phase() != TaskPhase::Running
    })
    .await;
    assert_eq!(t.phase(), TaskPhase::Queued, "{:?}", t.status.reason);
    assert!(
        t.status
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("suspended before step"),
        "{:?}",
        t.status.reason
    );
    let at_suspend = recorded(log).len();
    assert!(at_suspend < 5, "the plan ran on: {at_suspend} calls");
    // Finished steps are kept; nothing runs while suspended.
    assert!(
        t.status
            .steps
            .iter()
            .filter(|s| s.outcome == StepOutcome::Done)
            .count()
            >= 4
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(recorded(log).len(), at_suspend);
    assert_eq!(
        rt.store.get_task(&id).await.unwrap().unwrap().phase(),
        TaskPhase::Queued
    );

    // Resumed: the plan carries on where it stopped and repeats nothing.
    rt.store.put_policy(p.clone()).await.unwrap();
    let t = f.finished(&id).await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    let calls = recorded(log);
    let keys: Vec<&str> = calls
        .iter()
        .map(|c| c.arguments["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["k0", "k1", "k2", "k3", "k4"]);
    assert!(calls.iter().all(|c| !c.duplicate));

    // Cancel between steps: the plan stops and the task ends Cancelled.
    let before = recorded(log).len();
    let id2 = f.submit(2, "five slow writes again").await;
    wait_for_calls(log, before + 1).await;
    rt.store.request_cancel(&id2).await.unwrap();
    let t2 = f.finished(&id2).await;
    assert_eq!(t2.phase(), TaskPhase::Cancelled);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = recorded(log).len();
    assert!(
        after - before < 5,
        "the cancelled plan ran on: {} calls",
        after - before
    );
    f.stop().await;
}

// ---------------------------------------------------------------------------------------------
// SIGKILL mid-plan, with the real binary.

/// The `agentplane dev` process; killed if the test ends early.
struct Dev(Option<Child>);

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_dev(dir: &Path) -> Dev {
    Dev(Some(
        Command::new(env!("CARGO_BIN_EXE_agentplane"))
            .args(["dev", "--listen", "127.0.0.1:0"])
            .args(["--join-token", "j0"])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("dev.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap(),
    ))
}

/// The store of a data directory, opened beside (or without) a running `agentplane dev`.
fn dev_store(dir: &Path) -> std::sync::Arc<SqliteStore> {
    SqliteStore::new(Db::open(&dir.join("agentplane.sqlite")).unwrap(), "default")
}

/// Seeds a data directory for `agentplane dev`: the model key, a policy offering the recorder's
/// `tool` with `model` as the tier, one device and one submitted task. Returns the recorder's log
/// and the task id.
async fn seed_dev(
    dir: &Path,
    model: &ModelServer,
    kind: EndpointKind,
    tool_name: &str,
    prompt: &str,
) -> (PathBuf, String) {
    scripted_model::write_key(dir);
    let log = dir.join("calls.jsonl");
    let policy = policy(
        kind,
        &model.base,
        vec![recorder_server(&log)],
        vec![tool("rec", tool_name, false)],
    );
    let device = DeviceIdentity::generate("kiosk-1").unwrap();
    let store = dev_store(dir);
    store.put_policy(policy).await.unwrap();
    store
        .put_device("kiosk-1", device_spec(&device))
        .await
        .unwrap();
    (log, submit(&*store, &device, 1, prompt).await)
}

/// The task's journal rows as (step, outcome), read from the data directory's database.
async fn journaled(dir: &Path, id: &str) -> Vec<(u32, StepOutcome)> {
    let journal = SqliteJournal::new(Db::open(&dir.join("agentplane.sqlite")).unwrap())
        .await
        .unwrap();
    let steps = journal.steps(id).await.unwrap();
    steps.iter().map(|s| (s.step, s.outcome)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_step_two_resumes_and_repeats_no_finished_tool_call() {
    // Anthropic format. The third model turn is held until the worker has been killed.
    let model = ModelServer::start(three_records()).await;
    model.state.lock().unwrap().hold = Some(2);
    let dir = tempfile::tempdir().unwrap();
    let (log, id) = seed_dev(
        dir.path(),
        &model,
        EndpointKind::Anthropic,
        "write_record",
        "write three records",
    )
    .await;
    let mut dev = start_dev(dir.path());

    // Step 4 (the second tool call) has had its effect and the worker is asking the model for step 5.
    for _ in 0..1200 {
        if model.asked_for_turn(2) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        model.asked_for_turn(2),
        1,
        "the plan did not reach its third model turn"
    );
    let before = recorded(&log);
    assert_eq!(before.len(), 2, "{before:?}");
    dev.0.as_mut().unwrap().kill().unwrap(); // SIGKILL
    dev.0.as_mut().unwrap().wait().unwrap();
    assert_eq!(
        journaled(dir.path(), &id).await,
        vec![
            (1, StepOutcome::Done),
            (2, StepOutcome::Done),
            (3, StepOutcome::Done),
            (4, StepOutcome::Done),
            (5, StepOutcome::Pending)
        ]
    );
    // `send_replace`: the held request's handler went away with the killed worker's connection.
    model.release.send_replace(true);
    let _dev = start_dev(dir.path());
    let store = dev_store(dir.path());
    let t = wait_for(&*store, &id, 60, "a terminal phase", |t| {
        t.phase().is_terminal()
    })
    .await;
    assert_three_records_once(&t, &log);
    // Step 5 was asked again under the same key; steps 1 and 3 were not asked again.
    let keys: Vec<String> = model.seen().iter().map(|(_, k, _)| k.clone()).collect();
    let k = |n: u32| format!("{id}/model/{n}");
    assert_eq!(keys, vec![k(1), k(3), k(5), k(5), k(7)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_inside_a_tool_call_reissues_it_under_the_same_key_and_its_effect_happens_once()
 {
    // OpenAI format. Step 2 is `slow_write`: the recorder logs the call (its effect) at once and
    // holds the reply for 20 s, so the kill lands after the effect and before the worker has
    // the result: the journal row stays `pending`.
    let script = vec![
        Scripted::Calls(vec![(
            "rec__slow_write",
            json!({"key": "a", "value": "1", "seconds": 20}),
        )]),
        Scripted::Answer,
    ];
    let model = ModelServer::start(script).await;
    let dir = tempfile::tempdir().unwrap();
    let (log, id) = seed_dev(
        dir.path(),
        &model,
        EndpointKind::Openai,
        "slow_write",
        "one slow write",
    )
    .await;
    let mut dev = start_dev(dir.path());
    let first = wait_for_calls(&log, 1).await;
    assert_eq!(
        model.asked_for_turn(1),
        0,
        "the tool call had already answered"
    );
    dev.0.as_mut().unwrap().kill().unwrap(); // SIGKILL, mid-call
    dev.0.as_mut().unwrap().wait().unwrap();

    // The recorder runs in its own process group, so the SIGKILL did not reach it; its stdin
    // closed with the worker, and the SDK's stdio server then exits (its reply meets a broken
    // pipe) without finishing the 20 s call and without logging anything more. So the orphan
    // is gone before the restart and cannot answer, or log, on the new worker's behalf.
    assert_gone(first[0].pid).await;
    assert_eq!(recorded(&log).len(), 1, "the orphaned server logged more");
    assert_eq!(model.asked_for_turn(1), 0);
    assert_eq!(
        journaled(dir.path(), &id).await,
        vec![(1, StepOutcome::Done), (2, StepOutcome::Pending)],
        "the tool step's row is begun, not finished, at restart"
    );

    let _dev = start_dev(dir.path());
    let store = dev_store(dir.path());
    let t = wait_for(&*store, &id, 60, "a terminal phase", |t| {
        t.phase().is_terminal()
    })
    .await;
    assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
    assert_eq!(t.status.result.as_deref(), Some("results: stored a=1"));
    // Step 2 was issued again under the same key, by a new server process, and recognised as
    // a repeat: the effect happened once.
    let calls = recorded(&log);
    let seen: Vec<(&str, &str, bool)> = calls
        .iter()
        .map(|c| (c.tool.as_str(), c.key.as_str(), c.duplicate))
        .collect();
    let key = format!("{id}/tool/2");
    assert_eq!(
        seen,
        vec![
            ("slow_write", key.as_str(), false),
            ("slow_write", key.as_str(), true)
        ]
    );
    assert_ne!(calls[0].pid, calls[1].pid);
    assert_eq!(calls[1].arguments, calls[0].arguments);
    // The finished model step 1 was not asked again; step 3 was asked once.
    let keys: Vec<String> = model.seen().iter().map(|(_, k, _)| k.clone()).collect();
    assert_eq!(keys, vec![format!("{id}/model/1"), format!("{id}/model/3")]);
    let steps: Vec<(u32, StepKind, StepOutcome)> = t
        .status
        .steps
        .iter()
        .map(|s| (s.index, s.kind, s.outcome))
        .collect();
    assert_eq!(
        steps,
        vec![
            (1, StepKind::Model, StepOutcome::Done),
            (2, StepKind::Tool, StepOutcome::Done),
            (3, StepKind::Model, StepOutcome::Done)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Benchmark (ci/bench/runtime/plan_steps.sh runs it in release).

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs one bench task to Succeeded.
async fn run_task(store: &dyn TaskStore, device: &DeviceIdentity, seq: u64) -> TaskRecord {
    let id = submit(store, device, seq, "bench").await;
    loop {
        let t = store.get_task(&id).await.unwrap().unwrap();
        if t.phase().is_terminal() {
            assert_eq!(t.phase(), TaskPhase::Succeeded, "{:?}", t.status.reason);
            return t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Per-step cost of the plan loop (kill-switch reads, journal begin/finish, the gate, the status
/// write, the MCP call) beside a direct MCP call of the same tool, in the same run. One model turn
/// asks for `STEPS` echo calls; the time from the first tool step's start to the last one's (the
/// journal's `startedAt`, in milliseconds, over `STEPS - 1` intervals) is what a tool step costs
/// through the loop, without the model turns and the MCP connection around them.
/// Goal: the loop adds < 2 ms per step (embedded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: ci/bench/runtime/plan_steps.sh runs it in release"]
async fn bench_plan_step_overhead() {
    const STEPS: usize = 40;
    let rounds: usize = std::env::var("PLAN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    let echo = || ("everything__echo", json!({"message": "bench"}));
    let everything_server = server("everything", everything(), vec!["stdio".into()]);
    let model = ModelServer::start(vec![
        Scripted::Calls((0..STEPS).map(|_| echo()).collect()),
        Scripted::Answer,
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut p = policy(
        EndpointKind::Openai,
        &model.base,
        vec![everything_server.clone()],
        vec![tool("everything", "echo", false)],
    );
    // Two model turns around the tool steps.
    p.max_steps = Some(STEPS as u32 + 2);
    let (rt, device) = start(dir.path(), p).await;
    let journal = SqliteJournal::new(Db::open(&dir.path().join("agentplane.sqlite")).unwrap())
        .await
        .unwrap();
    let session = agentplane::mcp::McpSession::connect(&everything_server, None)
        .await
        .unwrap();
    let (mut direct, mut per_step) = (Vec::new(), Vec::new());
    // One warm-up round, not counted.
    for round in 0..=rounds {
        let t = run_task(&*rt.store, &device, round as u64 + 1).await;
        // The journal keeps milliseconds (status times are whole seconds). Steps 2..=STEPS+1 are
        // the tool calls (index 1..=STEPS in the list).
        let steps = journal.steps(&t.id).await.unwrap();
        let span = steps[STEPS].started_at.duration_since(steps[1].started_at);
        let mut calls = Vec::new();
        for i in 0..STEPS {
            let begun = std::time::Instant::now();
            session
                .call(
                    "echo",
                    json!({"message": "bench"}).as_object().unwrap().clone(),
                    &format!("direct/{round}/{i}"),
                )
                .await
                .unwrap();
            calls.push(begun.elapsed().as_secs_f64() * 1e3);
        }
        if round > 0 {
            per_step.push(span.as_secs_f64() * 1e3 / (STEPS - 1) as f64);
            direct.push(median(calls));
        }
    }
    session.close().await;
    rt.stop().await;

    let direct_ms = median(direct);
    let per_step_ms = median(per_step);
    let overhead_ms = per_step_ms - direct_ms;
    println!(
        "plan-step bench: {rounds} rounds, {STEPS} tool steps per plan (server-everything echo over stdio, audit log on)"
    );
    println!("  tool step through the plan loop, median: {per_step_ms:.3} ms");
    println!("  direct MCP call (same tool, same run), median: {direct_ms:.3} ms");
    println!(
        "  plan-loop overhead per step (journal + gate + kill-switch reads + status write): {overhead_ms:.3} ms; ratio plan step / direct call: {:.2}",
        per_step_ms / direct_ms
    );
    if overhead_ms < 2.0 {
        println!("  goal < 2 ms per step: met");
    } else {
        println!("MISSED: plan-loop overhead {overhead_ms:.3} ms per step is over the 2 ms goal");
        panic!("MISSED: the plan loop's per-step overhead goal");
    }
}
