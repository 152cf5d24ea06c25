//! A distributed runtime on the real-peer stack: kube-apiserver + etcd and moto, with the
//! `agentplane operator`, `worker` and `gateway` binaries run as processes (so tests can SIGKILL
//! them). Each `Cluster` has its own namespace and its own FIFO queue + DLQ.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::queue::TaskQueue;
use agentplane::queue::sqs::{SqsQueue, ensure_queue_pair};
use agentplane::store::TaskStore;
use agentplane::store::kubernetes::KubeStore;
use agentplane_api::policy::{
    AgentPolicySpec, EndpointKind, IntentRule, ModelTier, RateLimitAction, UnlistedIntents,
};
use agentplane_testsupport::Stack;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

pub const JOIN_TOKEN: &str = "join-cluster";
pub const APPROVER: &str = "alice";
pub const APPROVER_TOKEN: &str = "alice-secret";
pub const MAX_RECEIVE_COUNT: u32 = 2;
/// Short, so redelivery after a killed worker happens within the test's patience.
pub const VISIBILITY_SECS: u64 = 3;

pub struct Cluster {
    pub stack: &'static Stack,
    pub client: kube::Client,
    pub namespace: String,
    pub store: Arc<KubeStore>,
    pub queue: Arc<SqsQueue>,
    pub dlq: Arc<SqsQueue>,
    pub logs: tempfile::TempDir,
    pub gateway: Option<Proc>,
    /// Extra environment for the components started from now on (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
    /// The gateway's base URL once `start_gateway` has run.
    pub gateway_url: Option<String>,
}

/// A running component; killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub metrics: String,
}

impl Proc {
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY-free: kill(2) through the shell's `kill`, no libc dependency needed.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .expect("wait")
    }

    /// The component's /metrics, waiting up to 30 s for the listener (the process may be starting).
    pub async fn metrics_text(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match reqwest::get(&url).await {
                Ok(r) => return r.text().await.unwrap(),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("{} metrics unreachable: {e}", self.name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The policy every cluster starts with: summarize on the builtin echo tier, purchase needs approval,
/// shell is refused, a `slow` tier (builtin:sleep) and a `broken` tier (builtin:fail).
pub fn policy() -> AgentPolicySpec {
    let rule = |kind: &str, allowed: bool, requires_approval: bool| IntentRule {
        kind: kind.into(),
        allowed,
        requires_approval,
        privacy_levels: vec![],
        rate_limits: vec![],
        on_rate_limit: RateLimitAction::Deny,
        tools: vec![],
        max_steps: None,
    };
    let tier = |name: &str, endpoint: &str| ModelTier {
        name: name.into(),
        endpoint_kind: EndpointKind::Builtin,
        endpoint: endpoint.into(),
        model: None,
        price_per_1k_input_micros: 100,
        price_per_1k_output_micros: 200,
        privacy_levels: vec![],
        gpu: false,
        secret_ref: None,
    };
    AgentPolicySpec {
        suspend: false,
        intents: vec![rule("purchase", true, true), rule("shell", false, false)],
        unlisted_intents: UnlistedIntents::Allow,
        models: vec![
            tier("builtin", "builtin:echo"),
            tier("slow", "builtin:sleep"),
            tier("broken", "builtin:fail"),
        ],
        budgets: vec![],
        approvers: vec![APPROVER.into()],
        ..Default::default()
    }
}

impl Cluster {
    pub async fn new(name: &str) -> Cluster {
        let stack =
            Stack::shared().expect("the real-peer stack must start (run `make peers` first)");
        let client = stack.kube_client().await.expect("kube client");
        let crds: Vec<serde_json::Value> = agentplane_api::crds()
            .iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect();
        agentplane_testsupport::apply_crds(&client, &crds, "agentplane-tests")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let namespace = format!("{name}-{suffix}");
        let ns: Api<Namespace> = Api::all(client.clone());
        ns.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .expect("namespace");
        let sqs = aws_sdk_sqs::Client::new(&stack.aws_sdk_config().await);
        let pair = ensure_queue_pair(
            &sqs,
            &namespace,
            true,
            MAX_RECEIVE_COUNT,
            Duration::from_secs(VISIBILITY_SECS),
        )
        .await
        .expect("queue pair");
        let store = KubeStore::new(client.clone(), &namespace);
        store.put_policy(policy()).await.expect("policy");
        Cluster {
            stack,
            client,
            store,
            queue: SqsQueue::new(sqs.clone(), pair.queue_url),
            dlq: SqsQueue::new(sqs, pair.dlq_url),
            namespace,
            logs: tempfile::tempdir().unwrap(),
            gateway: None,
            env: Vec::new(),
            gateway_url: None,
        }
    }

    fn command(
        &self,
        sub: &str,
        name: &str,
        extra: &[(&str, String)],
    ) -> (Command, PathBuf, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentplane"));
        let metrics = format!("127.0.0.1:{}", free_port());
        cmd.arg(sub)
            .envs(self.stack.env())
            .env("AGENTPLANE_NAMESPACE", &self.namespace)
            .env("AGENTPLANE_METRICS_LISTEN", &metrics)
            .env("AGENTPLANE_LOG_FORMAT", "text")
            .env("RUST_LOG", "info,agentplane=debug")
            .env("AGENTPLANE_QUEUE_URL", self.queue.url())
            .env("AGENTPLANE_DLQ_URL", self.dlq.url())
            .kill_on_drop(true);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let log = self.logs.path().join(format!("{name}.log"));
        (cmd, log, metrics)
    }

    fn spawn(&self, sub: &str, name: &str, extra: &[(&str, String)]) -> Proc {
        let (mut cmd, log, metrics) = self.command(sub, name, extra);
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::null()).stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting agentplane {sub}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
            metrics,
        }
    }

    pub fn operator(&self, identity: &str) -> Proc {
        self.spawn(
            "operator",
            identity,
            &[
                ("AGENTPLANE_POD_NAME", identity.to_owned()),
                ("AGENTPLANE_LEASE_DURATION_SECS", "4".into()),
                ("AGENTPLANE_CONCURRENCY", "8".into()),
            ],
        )
    }

    pub fn worker(&self, name: &str) -> Proc {
        self.spawn(
            "worker",
            name,
            &[
                (
                    "AGENTPLANE_VISIBILITY_TIMEOUT_SECS",
                    VISIBILITY_SECS.to_string(),
                ),
                ("AGENTPLANE_WAIT_SECS", "1".into()),
                ("AGENTPLANE_WORKERS", "4".into()),
            ],
        )
    }

    /// Starts the gateway and returns a client for it.
    pub async fn start_gateway(&mut self) -> GatewayClient {
        let (mut cmd, log, metrics) = self.command(
            "gateway",
            "gateway",
            &[
                ("AGENTPLANE_LISTEN", "127.0.0.1:0".into()),
                ("AGENTPLANE_JOIN_TOKEN", JOIN_TOKEN.into()),
                (
                    "AGENTPLANE_APPROVERS",
                    format!("{APPROVER}={APPROVER_TOKEN}"),
                ),
            ],
        );
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::piped()).stderr(file);
        let mut child = cmd.spawn().expect("starting agentplane gateway");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("agentplane gateway listening on ") {
                    return rest.trim().to_owned();
                }
            }
            panic!(
                "gateway exited before listening: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .await
        .expect("gateway listens within 60 s");
        self.gateway = Some(Proc {
            name: "gateway".into(),
            child,
            log,
            metrics,
        });
        self.gateway_url = Some(url.clone());
        GatewayClient::new(&url)
    }

    /// Every component's log, for a failing assertion's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.logs.path()) {
            for e in dir.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("==== {}\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Waits for a task to reach a terminal phase (or `phase`), reading the API directly.
    pub async fn wait_phase(
        &self,
        id: &str,
        done: impl Fn(agentplane_api::TaskPhase) -> bool,
        within: Duration,
    ) -> agentplane::store::TaskRecord {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(t) = self.store.get_task(id).await.unwrap()
                && done(t.phase())
            {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                let t = self.store.get_task(id).await.unwrap();
                panic!(
                    "task {id} did not get there in {within:?}; now {:?}\n{}",
                    t.map(|t| (t.phase(), t.status.reason)),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_terminal(&self, id: &str) -> agentplane::store::TaskRecord {
        self.wait_phase(id, |p| p.is_terminal(), Duration::from_secs(90))
            .await
    }

    /// Registers a device directly (as `agentplane_edge_device` or kubectl would).
    pub async fn device(&self, name: &str) -> DeviceIdentity {
        let d = DeviceIdentity::generate(name).unwrap();
        self.store
            .put_device(
                name,
                agentplane_api::device::EdgeDeviceSpec {
                    public_keys: vec![d.public_key()],
                    owner: "owner".into(),
                    allowed_intents: vec![],
                    revoked: false,
                },
            )
            .await
            .unwrap();
        d
    }

    /// Admits a signed task straight into the store (as the gateway does), returning its id.
    pub async fn admit(
        &self,
        d: &DeviceIdentity,
        payload: &agentplane_api::IntentPayload,
    ) -> String {
        let envelope = d.sign(payload).unwrap();
        self.store
            .admit(agentplane::store::NewTask {
                id: payload.task_id.clone(),
                spec: agentplane_api::task::AgentTaskSpec::for_payload(envelope, payload),
                seq: payload.seq,
                trace_id: None,
            })
            .await
            .unwrap();
        payload.task_id.clone()
    }

    /// Messages in the queue (visible + in flight).
    pub async fn depth(&self) -> u64 {
        self.queue.depth().await.unwrap()
    }

    pub async fn task_count(&self) -> usize {
        let api: Api<agentplane_api::task::AgentTask> =
            Api::namespaced(self.client.clone(), &self.namespace);
        api.list(&Default::default()).await.unwrap().items.len()
    }
}

/// Parses a metrics scrape (prometheus-parse) into `name{label="value",...}` (labels sorted) -> value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("a Prometheus text scrape");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            let key = if labels.is_empty() {
                s.metric
            } else {
                let rendered: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                format!("{}{{{}}}", s.metric, rendered.join(","))
            };
            Some((key, value))
        })
        .collect()
}
