//! `agentplane dev-bench` (hidden): the embedded path of `ci/bench/runtime`. Starts the embedded runtime
//! in-process, drives signed intents over HTTP from several devices, and measures submit -> Succeeded
//! (202, then the event stream to its terminal event). The floor measured in the same run is the same
//! client doing `GET /healthz` (one HTTP round trip plus one store round trip) as fast as it can.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::runtime::{Embedded, EmbeddedConfig};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use anyhow::Context as _;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Tasks to run.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Devices submitting at once (each sends its outbox in seq order, one task at a time).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Worker consumers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
}

pub(crate) struct Figures {
    pub(crate) per_sec: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

pub(crate) fn figures(mut lat: Vec<Duration>, wall: Duration) -> Figures {
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        per_sec: lat.len() as f64 / wall.as_secs_f64().max(1e-9),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Quiet unless RUST_LOG asks: logging every task would measure the terminal, not the runtime.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "agentplane-bench-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let concurrency = args.concurrency.max(1);
    let tokens: Vec<String> = (0..concurrency)
        .map(|i| format!("bench-join-{i}"))
        .collect();
    let embedded = Embedded::start(EmbeddedConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.clone(),
        join_tokens: tokens.clone(),
        gateway: GatewayConfig {
            approvers: vec![ApproverCredential::new("admin", "unused")],
            ..GatewayConfig::default()
        },
        worker: WorkerConfig {
            concurrency: args.workers.max(1),
            wait: Duration::from_millis(500),
            ..WorkerConfig::default()
        },
        ..EmbeddedConfig::default()
    })
    .await
    .context("starting the embedded runtime")?;
    let client = Arc::new(GatewayClient::new(&embedded.base_url()));

    // Floor: the same client, same concurrency, GET /healthz.
    let floor = {
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for w in 0..concurrency {
            let client = client.clone();
            let n = args.tasks / concurrency + usize::from(w < args.tasks % concurrency);
            set.spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let r = client
                        .http
                        .get(format!("{}/healthz", client.base))
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "healthz {}", r.status());
                    r.bytes().await?;
                    lat.push(t.elapsed());
                }
                anyhow::Ok(lat)
            });
        }
        let mut lat = Vec::new();
        while let Some(r) = set.join_next().await {
            lat.extend(r??);
        }
        figures(lat, started.elapsed())
    };

    let mut devices = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let d = DeviceIdentity::generate(&format!("bench-{i}"))?;
        client.enroll(token, &d, "bench").await?;
        devices.push(d);
    }
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (w, d) in devices.into_iter().enumerate() {
        let client = client.clone();
        let n = args.tasks / concurrency + usize::from(w < args.tasks % concurrency);
        set.spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for seq in 1..=n as u64 {
                let env =
                    d.sign(&d.intent(seq, "summarize", "benchmark prompt with a few words"))?;
                let t = Instant::now();
                let accepted = client.submit(&env).await?;
                let last = client.follow(&d, &accepted.task_id, |_| {}).await?;
                anyhow::ensure!(
                    last.phase == TaskPhase::Succeeded,
                    "task ended {}",
                    last.phase
                );
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = set.join_next().await {
        lat.extend(r??);
    }
    let run = figures(lat, started.elapsed());
    embedded.stop().await;
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "embedded runtime, builtin:echo, {} tasks, {} devices, {} workers",
        args.tasks, concurrency, args.workers
    );
    println!(
        "  submit -> Succeeded: {:.0} tasks/s, p50 {:.2} ms, p99 {:.2} ms (goal >= 1000 tasks/s, p99 < 50 ms)",
        run.per_sec,
        ms(run.p50),
        ms(run.p99)
    );
    println!(
        "  floor (GET /healthz): {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
        floor.per_sec,
        ms(floor.p50),
        ms(floor.p99)
    );
    println!(
        "  ratio tasks/s : floor req/s = {:.3}",
        run.per_sec / floor.per_sec.max(1e-9)
    );
    Ok(())
}
