//! One W3C trace from the edge agent's UI action to the model endpoint, collected by an OTLP receiver
//! running in this test: the gateway, operator and worker binaries export over OTLP/gRPC (tonic's
//! `TraceService` server here), the edge agent binary over OTLP/HTTP with protobuf (an axum route
//! decoding `ExportTraceServiceRequest`). The runtime runs on the real-peer stack (kube-apiserver +
//! etcd, moto for SQS and KMS); the model tier is an OpenAI-compatible endpoint in this test that
//! records the `traceparent` it is called with.
//!
//! Needs the edge agent binary beside `agentplane` (`cargo build -p agentplane-edge`; `cargo test
//! --workspace` builds it) or `$AGENTPLANE_EDGE_BIN`.

mod cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentplane::secrets::KubeKmsSecrets;
use agentplane::store::TaskStore as _;
use agentplane::telemetry;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{EndpointKind, ModelTier, SecretKeyRef};
use agentplane_api::task::{AgentTask, TRACEPARENT_ANNOTATION};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use cluster::{Cluster, JOIN_TOKEN};
use kube::api::Api;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const EDGE_SERVICE: &str = "edge-under-test";
const GATEWAY_SERVICE: &str = "gateway-under-test";
const OPERATOR_SERVICE: &str = "operator-under-test";
const WORKER_SERVICE: &str = "worker-under-test";

/// One span as received.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    /// Export requests per transport, to show both were used.
    requests: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Collector {
    fn take(&self, transport: &'static str, req: ExportTraceServiceRequest) {
        *self.requests.lock().unwrap().entry(transport).or_default() += 1;
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .and_then(|v| match v {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex::encode(s.trace_id),
                        span_id: hex::encode(s.span_id),
                        parent_span_id: hex::encode(s.parent_span_id),
                    });
                }
            }
        }
    }

    fn in_trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take("grpc", request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// OTLP/gRPC on one port, OTLP/HTTP (`POST /v1/traces`, protobuf) on another.
async fn start_receiver() -> (Collector, SocketAddr, SocketAddr) {
    let collector = Collector::default();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc))
            .await
            .unwrap();
    });
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let c = collector.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let c = c.clone();
            async move {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct != "application/x-protobuf" {
                    return (StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                }
                match ExportTraceServiceRequest::decode(body) {
                    Ok(req) => {
                        c.take("http", req);
                        (
                            StatusCode::OK,
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                    }
                    Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(http, app).await.unwrap() });
    (collector, grpc_addr, http_addr)
}

/// An OpenAI-compatible model endpoint that records the `traceparent` of each call.
async fn start_model() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |headers: HeaderMap| {
            let s = s.clone();
            async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                s.lock().unwrap().push(tp);
                axum::Json(json!({
                    "choices": [{"message": {"role": "assistant", "content": "traced reply"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), seen)
}

fn edge_bin() -> PathBuf {
    let path = match std::env::var_os("AGENTPLANE_EDGE_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_BIN_EXE_agentplane")).with_file_name("agentplane-edge"),
    };
    assert!(
        path.exists(),
        "the edge agent binary {} is missing: run `cargo build -p agentplane-edge` (or `cargo test --workspace`), or set AGENTPLANE_EDGE_BIN",
        path.display()
    );
    path
}

fn otel_env(endpoint: String, protocol: &str, service: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        // Short batches: spans arrive while the test polls, not only at shutdown.
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Polls `check` every 100 ms for up to `secs`.
async fn eventually<T>(secs: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn by_name<'a>(spans: &'a [Received], service: &str, name: &str) -> Vec<&'a Received> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

fn ids(spans: &[&Received]) -> BTreeSet<String> {
    spans.iter().map(|s| s.span_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_edge_ui_through_gateway_operator_and_worker() {
    let edge = edge_bin();
    let (collector, grpc, http) = start_receiver().await;
    let (model_url, model_calls) = start_model().await;
    let mut c = Cluster::new("tracing").await;

    // The top tier is the model endpoint above; its key is KMS-sealed in a Secret, as in production.
    let kms = aws_sdk_kms::Client::new(&c.stack.aws_sdk_config().await);
    let key_id = kms
        .create_key()
        .description("agentplane tracing test")
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_id;
    let secret = SecretKeyRef {
        name: "model-key".into(),
        key: "api-key".into(),
    };
    KubeKmsSecrets::new(c.client.clone(), &c.namespace, kms)
        .put(&key_id, &secret, b"sk-tracing-test")
        .await
        .unwrap();
    let mut policy = cluster::policy();
    policy.models.insert(
        0,
        ModelTier {
            name: "traced".into(),
            endpoint_kind: EndpointKind::Openai,
            endpoint: model_url,
            model: Some("test-model".into()),
            price_per_1k_input_micros: 100,
            price_per_1k_output_micros: 200,
            privacy_levels: vec![],
            gpu: false,
            secret_ref: Some(secret),
        },
    );
    c.store.put_policy(policy).await.unwrap();

    let grpc_endpoint = format!("http://{grpc}");
    c.env = otel_env(grpc_endpoint.clone(), "grpc", GATEWAY_SERVICE);
    c.start_gateway().await;
    let gateway_url = c.gateway_url.clone().unwrap();
    c.env = otel_env(grpc_endpoint.clone(), "grpc", OPERATOR_SERVICE);
    let operator = c.operator("op-trace");
    c.env = otel_env(grpc_endpoint, "grpc", WORKER_SERVICE);
    let worker = c.worker("worker-trace");

    // The edge agent: enrolled through the gateway, then run with its local UI/API.
    let data = c.logs.path().join("edge");
    let out = tokio::process::Command::new(&edge)
        .arg("--data-dir")
        .arg(&data)
        .args(["enroll", "--gateway", &gateway_url, "--token", JOIN_TOKEN])
        .args(["--device-id", "trace-kiosk", "--owner", "alice"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edge_log = c.logs.path().join("edge.log");
    let mut agent = tokio::process::Command::new(&edge)
        .arg("--data-dir")
        .arg(&data)
        .args(["run", "--listen", "127.0.0.1:0", "--poll-ms", "100"])
        .envs(otel_env(
            format!("http://{http}"),
            "http/protobuf",
            EDGE_SERVICE,
        ))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&edge_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let ui = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("agentplane-edge listening on ") {
                return rest.trim().to_owned();
            }
        }
        panic!(
            "the edge agent exited: {}",
            std::fs::read_to_string(&edge_log).unwrap_or_default()
        )
    })
    .await
    .expect("the edge agent listens within 30 s");

    // The UI action.
    let r = reqwest::Client::new()
        .post(format!("{ui}/api/intents"))
        .json(&json!({"type": "summarize", "prompt": "trace me end to end"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let task_id = r.json::<Value>().await.unwrap()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let task = c.wait_terminal(&task_id).await;
    assert_eq!(
        task.phase(),
        TaskPhase::Succeeded,
        "{:?}\n{}",
        task.status.reason,
        c.logs()
    );
    assert_eq!(task.status.result.as_deref(), Some("traced reply"));

    // The task carries the edge's trace id: in status and in the annotation.
    let trace_id = task.status.trace_id.clone().expect("status.traceId");
    let obj = Api::<AgentTask>::namespaced(c.client.clone(), &c.namespace)
        .get(&task_id)
        .await
        .unwrap();
    let annotation = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRACEPARENT_ANNOTATION))
        .cloned()
        .expect("traceparent annotation");
    assert_eq!(
        telemetry::trace_id_in(&annotation).as_deref(),
        Some(trace_id.as_str())
    );

    // Every hop's span arrives at the receiver, in that one trace.
    let wanted = [
        (EDGE_SERVICE, "edge.capture"),
        (EDGE_SERVICE, "edge.submit"),
        (GATEWAY_SERVICE, "gateway.submit"),
        (OPERATOR_SERVICE, "operator.reconcile"),
        (OPERATOR_SERVICE, "controller.enqueue"),
        (WORKER_SERVICE, "worker.handle"),
        (WORKER_SERVICE, "worker.model_call"),
    ];
    let spans = eventually(60, || {
        let spans = collector.in_trace(&trace_id);
        let all_hops = wanted
            .iter()
            .all(|(svc, name)| !by_name(&spans, svc, name).is_empty());
        // Every model call made (a retried call too) has its span in.
        let calls = model_calls.lock().unwrap().len();
        let model_spans = by_name(&spans, WORKER_SERVICE, "worker.model_call").len();
        (all_hops && model_spans >= calls).then_some(spans)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "not every hop's span arrived in trace {trace_id}; got {:#?}\nall spans: {:#?}\n{}\n==== edge\n{}",
            collector.in_trace(&trace_id),
            collector.spans.lock().unwrap(),
            c.logs(),
            std::fs::read_to_string(&edge_log).unwrap_or_default()
        )
    });
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from([
            EDGE_SERVICE,
            GATEWAY_SERVICE,
            OPERATOR_SERVICE,
            WORKER_SERVICE
        ]),
        "{spans:#?}"
    );
    {
        let requests = collector.requests.lock().unwrap();
        assert!(
            requests.get("grpc").is_some_and(|n| *n > 0)
                && requests.get("http").is_some_and(|n| *n > 0),
            "both OTLP transports were used: {requests:?}"
        );
    }

    // The chain of parents, hop by hop.
    let capture = by_name(&spans, EDGE_SERVICE, "edge.capture");
    assert_eq!(capture.len(), 1, "{spans:#?}");
    assert_eq!(
        capture[0].parent_span_id, "",
        "the UI action starts the trace"
    );
    let submits = by_name(&spans, EDGE_SERVICE, "edge.submit");
    assert!(
        submits
            .iter()
            .all(|s| s.parent_span_id == capture[0].span_id),
        "{spans:#?}"
    );
    let gateway = by_name(&spans, GATEWAY_SERVICE, "gateway.submit");
    assert!(
        gateway
            .iter()
            .all(|s| ids(&submits).contains(&s.parent_span_id)),
        "the gateway's span is a child of the request's traceparent: {spans:#?}"
    );
    // The annotation is the admitting gateway span's context; every reconcile is its child.
    let annotated_span = annotation.split('-').nth(2).unwrap().to_owned();
    assert!(ids(&gateway).contains(&annotated_span), "{annotation}");
    let reconciles = by_name(&spans, OPERATOR_SERVICE, "operator.reconcile");
    assert!(
        reconciles
            .iter()
            .all(|s| s.parent_span_id == annotated_span),
        "reconciles are children of the annotation: {spans:#?}"
    );
    // (A resend after a lost write would enqueue again under the same dedup id; each is a hop.)
    let enqueues = by_name(&spans, OPERATOR_SERVICE, "controller.enqueue");
    assert!(
        enqueues
            .iter()
            .all(|s| ids(&reconciles).contains(&s.parent_span_id)),
        "{spans:#?}"
    );
    // The worker continues the trace only through the queue message's attribute.
    let handles = by_name(&spans, WORKER_SERVICE, "worker.handle");
    assert!(
        handles
            .iter()
            .all(|s| ids(&enqueues).contains(&s.parent_span_id)),
        "the worker's span is a child of the message's traceparent: {spans:#?}"
    );
    let model = by_name(&spans, WORKER_SERVICE, "worker.model_call");
    assert!(
        model
            .iter()
            .all(|s| ids(&handles).contains(&s.parent_span_id)),
        "{spans:#?}"
    );
    // The model endpoint was called with the model call's span as the parent.
    let calls: BTreeSet<String> = model_calls.lock().unwrap().iter().cloned().collect();
    let expected: BTreeSet<String> = model
        .iter()
        .map(|s| format!("00-{trace_id}-{}-01", s.span_id))
        .collect();
    assert_eq!(calls, expected, "the model calls' traceparents");

    // Shutting down flushes and exits cleanly with exporters running.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.id().unwrap().to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the edge agent exits within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "edge agent: {status}");
    for p in [worker, operator] {
        let name = p.name.clone();
        let status = p.terminate().await;
        assert!(status.success(), "{name}: {status}");
    }
    let gateway = c.gateway.take().unwrap();
    assert!(gateway.terminate().await.success());
}
