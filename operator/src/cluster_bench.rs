//! `agentplane cluster-bench` (hidden): the distributed path of `ci/bench/runtime`, run against a
//! stack from `ci/stack.sh` (KUBECONFIG and the AWS variables in the environment).
//!
//! Two passes over the same number of tasks with the same number of concurrent chains (each chain
//! does one task at a time, like a device sending its outbox in order):
//! - the floor: a client with no logic doing the writes one task costs the cluster at least: create
//!   the AgentTask, move its device's lastSeq (the replay guard's status write), send the message,
//!   apply status Queued, receive, apply Running, apply Succeeded, delete the message;
//! - the runtime: `agentplane operator` and `agentplane worker` processes; the bench admits signed
//!   tasks through the store (as the gateway does) and waits on the watch for Succeeded.
//!
//! Prints tasks/s and p50/p99 create -> Succeeded for both, their ratio, and the operator's CPU time
//! per task (from /proc).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane::client::DeviceIdentity;
use agentplane::queue::sqs::{SqsQueue, ensure_queue_pair};
use agentplane::queue::{Outgoing, TaskQueue};
use agentplane::store::kubernetes::{KubeStore, task_object};
use agentplane::store::{NewTask, TaskStore, Version};
use agentplane_api::TaskPhase;
use agentplane_api::task::{AgentTask, AgentTaskSpec, AgentTaskStatus};
use anyhow::Context as _;

use crate::bench::figures;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};

#[derive(clap::Args, Debug)]
pub struct ClusterBenchArgs {
    /// Tasks per pass.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Concurrent chains (devices).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Worker concurrency of the worker process.
    #[arg(long, default_value_t = 32)]
    workers: usize,
}

pub fn run(args: ClusterBenchArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

struct Setup {
    client: kube::Client,
    sqs: aws_sdk_sqs::Client,
    namespace: String,
}

async fn setup(tag: &str) -> anyhow::Result<Setup> {
    let client = agentplane::cloud::kube_client(None).await?;
    let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone());
    for crd in agentplane_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("agentplane-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("installing CRD {name}"))?;
    }
    // Let the API serve the new types.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let namespace = format!(
        "bench-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))?,
    )
    .await
    .context("creating the bench namespace")?;
    let aws = agentplane::cloud::aws_config(None, None).await;
    Ok(Setup {
        client,
        sqs: aws_sdk_sqs::Client::new(&aws),
        namespace,
    })
}

async fn bench(args: ClusterBenchArgs) -> anyhow::Result<()> {
    let chains = args.concurrency.max(1);
    let per_chain = args.tasks.div_ceil(chains);
    let total = per_chain * chains;

    // The floor.
    let s = setup("floor").await?;
    let pair = ensure_queue_pair(&s.sqs, &s.namespace, false, 5, Duration::from_secs(30)).await?;
    let queue = SqsQueue::new(s.sqs.clone(), pair.queue_url.clone());
    let tasks: Api<AgentTask> = Api::namespaced(s.client.clone(), &s.namespace);
    let devices: Api<agentplane_api::device::EdgeDevice> =
        Api::namespaced(s.client.clone(), &s.namespace);
    let floor_device = |c: usize| agentplane_api::device::EdgeDevice {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("floor-{c}")),
            ..Default::default()
        },
        spec: agentplane_api::device::EdgeDeviceSpec {
            public_keys: vec![],
            owner: "bench".into(),
            allowed_intents: vec![],
            revoked: false,
        },
        status: None,
    };
    for c in 0..chains {
        devices
            .create(&PostParams::default(), &floor_device(c))
            .await
            .context("creating a floor device")?;
    }
    let template = {
        let d = DeviceIdentity::generate("bench")?;
        let p = d.intent(1, "summarize", "hello bench");
        AgentTaskSpec::for_payload(d.sign(&p)?, &p)
    };
    let started = Instant::now();
    let mut joins = Vec::new();
    for c in 0..chains {
        let (tasks, queue, spec, ns) = (
            tasks.clone(),
            queue.clone(),
            template.clone(),
            s.namespace.clone(),
        );
        joins.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for i in 0..per_chain {
                let t0 = Instant::now();
                floor_task(
                    &tasks,
                    &*queue,
                    &ns,
                    &format!("floor-{c}-{i}"),
                    spec.clone(),
                )
                .await?;
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for j in joins {
        lat.extend(j.await??);
    }
    let floor = figures(lat, started.elapsed());

    // The runtime.
    let s = setup("runtime").await?;
    let pair = ensure_queue_pair(&s.sqs, &s.namespace, false, 5, Duration::from_secs(30)).await?;
    let store = KubeStore::new(s.client.clone(), &s.namespace);
    let mut policy = agentplane::runtime::default_policy();
    policy.intents.clear();
    store.put_policy(policy).await?;
    let exe = std::env::current_exe()?;
    let spawn = |sub: &str, extra: &[(&str, String)]| -> anyhow::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg(sub)
            .env("AGENTPLANE_NAMESPACE", &s.namespace)
            .env("AGENTPLANE_QUEUE_URL", &pair.queue_url)
            .env("AGENTPLANE_DLQ_URL", &pair.dlq_url)
            .env("AGENTPLANE_METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Ok(cmd.spawn()?)
    };
    let operator = spawn("operator", &[("AGENTPLANE_CONCURRENCY", "32".into())])?;
    let worker = spawn(
        "worker",
        &[
            ("AGENTPLANE_WORKERS", args.workers.to_string()),
            ("AGENTPLANE_WAIT_SECS", "1".into()),
        ],
    )?;
    let operator_pid = operator.id().context("operator pid")?;
    let mut devices = Vec::new();
    for c in 0..chains {
        let d = DeviceIdentity::generate(&format!("bench-{c}"))?;
        store
            .put_device(
                &format!("bench-{c}"),
                agentplane_api::device::EdgeDeviceSpec {
                    public_keys: vec![d.public_key()],
                    owner: "bench".into(),
                    allowed_intents: vec![],
                    revoked: false,
                },
            )
            .await?;
        devices.push(d);
    }
    // Warm up: one task end to end, so the operator holds its Lease and the worker is polling.
    let warm = &devices[0];
    run_task(&store, warm, 1, Duration::from_secs(120))
        .await
        .context("warm-up task")?;

    let cpu_before = cpu_ticks(operator_pid)?;
    let started = Instant::now();
    let mut joins = Vec::new();
    for (c, d) in devices.into_iter().enumerate() {
        let store = store.clone();
        joins.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let first = if c == 0 { 2 } else { 1 };
            for seq in first..first + per_chain as u64 {
                lat.push(run_task(&store, &d, seq, Duration::from_secs(120)).await?);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for j in joins {
        lat.extend(j.await??);
    }
    let runtime = figures(lat, started.elapsed());
    let cpu = cpu_ticks(operator_pid)?.saturating_sub(cpu_before);
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_per_task = Duration::from_secs_f64(cpu as f64 / ticks_per_sec / total as f64);
    drop((operator, worker));

    println!("distributed path ({total} tasks, {chains} chains, builtin model):");
    println!(
        "  floor (create, lastSeq write, 3 status applies, SQS send/receive/delete): {:>7.1} tasks/s  p50 {:>7.1} ms  p99 {:>7.1} ms",
        floor.per_sec,
        ms(floor.p50),
        ms(floor.p99)
    );
    println!(
        "  runtime (operator + worker processes):                                   {:>7.1} tasks/s  p50 {:>7.1} ms  p99 {:>7.1} ms",
        runtime.per_sec,
        ms(runtime.p50),
        ms(runtime.p99)
    );
    println!(
        "  runtime / floor throughput: {:.2} (goal >= 0.60)",
        runtime.per_sec / floor.per_sec.max(1e-9)
    );
    println!(
        "  operator CPU per task: {:.3} ms (goal < 1 ms)",
        cpu_per_task.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(get(11) + get(12))
}

/// One floor task: the cluster work of a task with no decisions in between.
async fn floor_task(
    tasks: &Api<AgentTask>,
    queue: &dyn TaskQueue,
    ns: &str,
    name: &str,
    spec: AgentTaskSpec,
) -> anyhow::Result<()> {
    let mut obj = task_object(name, ns, spec);
    obj.metadata.finalizers = None;
    let created = tasks.create(&PostParams::default(), &obj).await?;
    queue
        .send(Outgoing {
            body: name.to_owned(),
            attributes: Default::default(),
            group_id: None,
            dedup_id: None,
        })
        .await?;
    let mut version = Version(created.metadata.resource_version.unwrap_or_default());
    let apply = |phase: TaskPhase, version: &Version| {
        serde_json::json!({
            "apiVersion": "agentplane.dev/v1alpha1",
            "kind": "AgentTask",
            "metadata": {"name": name, "resourceVersion": version.0},
            "status": AgentTaskStatus { phase: Some(phase), ..Default::default() },
        })
    };
    let pp = PatchParams::apply("agentplane").force();
    let o = tasks
        .patch_status(
            name,
            &pp,
            &Patch::Apply(&apply(TaskPhase::Queued, &version)),
        )
        .await?;
    version = Version(o.metadata.resource_version.unwrap_or_default());
    // Any message will do: the floor measures the calls, not which task a message names.
    let got = loop {
        let d = queue
            .receive(1, Duration::from_secs(30), Duration::from_secs(1))
            .await?;
        if let Some(d) = d.into_iter().next() {
            break d;
        }
    };
    let o = tasks
        .patch_status(
            name,
            &pp,
            &Patch::Apply(&apply(TaskPhase::Running, &version)),
        )
        .await?;
    version = Version(o.metadata.resource_version.unwrap_or_default());
    tasks
        .patch_status(
            name,
            &pp,
            &Patch::Apply(&apply(TaskPhase::Succeeded, &version)),
        )
        .await?;
    queue.delete(&got.lease).await?;
    Ok(())
}

/// Admits one signed task and waits on the watch for it to succeed; returns create -> Succeeded.
async fn run_task(
    store: &Arc<KubeStore>,
    d: &DeviceIdentity,
    seq: u64,
    within: Duration,
) -> anyhow::Result<Duration> {
    let mut changes = store.changes();
    let p = d.intent(seq, "summarize", "hello bench");
    let id = p.task_id.clone();
    let t0 = Instant::now();
    store
        .admit(NewTask {
            id: id.clone(),
            spec: AgentTaskSpec::for_payload(d.sign(&p)?, &p),
            seq,
            trace_id: None,
        })
        .await?;
    let waited = tokio::time::timeout(within, async {
        loop {
            match changes.recv().await {
                Ok(ev) if ev.id == id && ev.phase.is_terminal() => return Ok(ev.phase),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if let Some(t) = store.get_task(&id).await?
                        && t.phase().is_terminal()
                    {
                        return Ok(t.phase());
                    }
                }
                Err(e) => return Err(anyhow::anyhow!("change feed closed: {e}")),
            }
        }
    })
    .await
    .with_context(|| format!("task {id} did not finish within {within:?}"))??;
    anyhow::ensure!(waited == TaskPhase::Succeeded, "task {id} ended {waited}");
    Ok(t0.elapsed())
}
