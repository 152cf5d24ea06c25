//! `agentplane dev-bench` (hidden): the embedded path of `ci/bench/runtime`. Starts the embedded runtime
//! in-process, drives signed intents over HTTP from several devices, and measures submit -> Succeeded
//! (202, then the event stream to its terminal event). The floor measured in the same run is the same
//! client doing `GET /healthz` (one HTTP round trip plus one store round trip) as fast as it can.
//!
//! Each runtime is measured twice: in a closed loop (every device submits its next intent as soon as
//! the last one finished), which finds the saturation throughput and whose latencies are mostly
//! queueing behind a busy CPU; and paced at `--rate` (default 1000 tasks/s, the runtime's rated
//! load), latencies counted from each intent's scheduled time, which is the latency a device sees at
//! that load.
//!
//! Governance (issue 7): the same runs are made with governance off (no audit log, a policy without
//! rate limits or budgets) and on (the audit log, and a policy with a generous rate limit and a budget
//! that does not run out), and with each half alone to show where the difference comes from; the modes
//! alternate over `--rounds` so drift on a shared machine hits them alike. The ratio of the on and off
//! p99s is the figure the < 10% goal is about; at saturation it is governance's CPU cost seen as
//! queueing, paced it is the latency governance adds. Beside it: what one audit append
//! and checkpoint cost (`audit::bench`), and the admission step alone (`controller::reconcile` from
//! Pending to Queued) with the policy off, on, and on with the audit log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentplane::audit::{AuditLog, AuditLogConfig, AuditedStore, Ed25519Signer};
use agentplane::client::{DeviceIdentity, GatewayClient};
use agentplane::controller::{Outcome, reconcile_with_ledger};
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::policy::Ledger;
use agentplane::queue::sqlite::SqliteQueue;
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy};
use agentplane::store::sqlite::{Db, SqliteStore};
use agentplane::store::{Admission, DynStore, NewTask};
use agentplane::worker::WorkerConfig;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{
    AgentPolicySpec, Budget, BudgetPeriod, IntentRule, RateLimit, RateLimitAction, Scope,
};
use agentplane_api::task::AgentTaskSpec;
use anyhow::Context as _;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Tasks per run (each round runs every governance mode).
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Devices submitting at once (each sends its outbox in seq order, one task at a time).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Worker consumers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Rounds of every mode (off, policy only, audit only, on); latencies are pooled per mode, and
    /// the on : off p99 ratio is also given per round with its median (five rounds: one noisy
    /// round moves the median less than with three).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Events for the audit append + checkpoint figure.
    #[arg(long, default_value_t = 2000)]
    audit_events: u64,
    /// Tasks for the admission-step figure (per policy setting).
    #[arg(long, default_value_t = 500)]
    admissions: usize,
    /// Offered load of the paced runs, tasks/s (default: the embedded runtime's rated 1000/s).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Run only the submit -> Succeeded runs of this mode (for profiling one of them); the
    /// comparisons, the audit log alone and the admission step are left out.
    #[arg(long, value_enum)]
    only: Option<Governance>,
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

/// The bench's intent: allowed by both policies, run on the builtin echo tier.
const INTENT: &str = "summarize";

/// Governance on: the default policy plus a rate limit per device and per namespace and a namespace
/// budget, all far above what the bench uses, so every task is admitted but each admission is
/// decided against the ledger (and priced) like a governed one.
fn governed_policy() -> AgentPolicySpec {
    let mut policy = default_policy();
    policy.intents.push(IntentRule {
        kind: INTENT.into(),
        allowed: true,
        requires_approval: false,
        privacy_levels: vec![],
        rate_limits: vec![
            RateLimit {
                scope: Scope::Device,
                requests: 1_000_000,
                period_seconds: 3600,
            },
            RateLimit {
                scope: Scope::Namespace,
                requests: 10_000_000,
                period_seconds: 3600,
            },
        ],
        on_rate_limit: RateLimitAction::Deny,
        tools: vec![],
        max_steps: None,
    });
    policy.budgets.push(Budget {
        scope: Scope::Namespace,
        limit_micros: 1_000_000_000_000,
        period: BudgetPeriod::Day,
    });
    policy
}

/// What a run turns on. `Off` and `On` are the comparison the goal is about; the two halves show
/// where the difference comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Governance {
    Off = 0,
    PolicyOnly = 1,
    AuditOnly = 2,
    On = 3,
}

const MODES: [Governance; 4] = [
    Governance::Off,
    Governance::PolicyOnly,
    Governance::AuditOnly,
    Governance::On,
];

impl Governance {
    fn label(self) -> &'static str {
        match self {
            Governance::Off => "governance off (no audit log, no rate limits or budgets)",
            Governance::PolicyOnly => "  rate limits + budget only",
            Governance::AuditOnly => "  audit log only",
            Governance::On => "governance on (audit log + rate limits + budget)",
        }
    }

    fn audit(self) -> bool {
        matches!(self, Governance::AuditOnly | Governance::On)
    }

    fn policy(self) -> AgentPolicySpec {
        match self {
            Governance::Off | Governance::AuditOnly => default_policy(),
            Governance::PolicyOnly | Governance::On => governed_policy(),
        }
    }
}

fn scratch_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "agentplane-bench-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// A started runtime with enrolled devices.
struct Runtime {
    embedded: Embedded,
    dir: PathBuf,
    client: Arc<GatewayClient>,
    devices: Vec<Arc<DeviceIdentity>>,
}

async fn start(args: &BenchArgs, governance: Governance) -> anyhow::Result<Runtime> {
    let dir = scratch_dir("runtime");
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
        audit: governance.audit(),
        initial_policy: Some(governance.policy()),
        ..EmbeddedConfig::default()
    })
    .await
    .context("starting the embedded runtime")?;
    let client = Arc::new(GatewayClient::new(&embedded.base_url()));
    let mut devices = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let d = DeviceIdentity::generate(&format!("bench-{i}"))?;
        client.enroll(token, &d, "bench").await?;
        devices.push(Arc::new(d));
    }
    Ok(Runtime {
        embedded,
        dir,
        client,
        devices,
    })
}

impl Runtime {
    async fn stop(self) {
        self.embedded.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The floor: the same client, same concurrency, GET /healthz.
    async fn floor(&self, requests: usize) -> anyhow::Result<Figures> {
        let concurrency = self.devices.len().max(1);
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for w in 0..concurrency {
            let client = self.client.clone();
            let n = requests / concurrency + usize::from(w < requests % concurrency);
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
        Ok(figures(lat, started.elapsed()))
    }

    /// Submits `tasks` intents (spread over the devices, each device's seqs from `first_seq` up) and
    /// follows each to Succeeded; returns the latencies and the wall time.
    ///
    /// Without `rate` every device submits its next intent as soon as the previous one finished (a
    /// closed loop: it finds the saturation throughput, and its latencies are mostly queueing). With
    /// `rate`, intents are offered on a fixed schedule (`rate` per second over all devices, each
    /// device's turn every `devices / rate` s) and a latency counts from the intent's scheduled time,
    /// not from when its device got round to it, so a slow task also charges the ones queued behind
    /// it (no coordinated omission).
    async fn tasks(&self, tasks: usize, first_seq: u64, rate: Option<f64>) -> anyhow::Result<Run> {
        let concurrency = self.devices.len().max(1);
        let started = tokio::time::Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (w, d) in self.devices.iter().cloned().enumerate() {
            let client = self.client.clone();
            let n = tasks / concurrency + usize::from(w < tasks % concurrency);
            set.spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for i in 0..n {
                    let seq = first_seq + i as u64;
                    let env =
                        d.sign(&d.intent(seq, INTENT, "benchmark prompt with a few words"))?;
                    let t = match rate {
                        Some(rate) => {
                            let slot = (i * concurrency + w) as f64 / rate;
                            let at = started + Duration::from_secs_f64(slot);
                            tokio::time::sleep_until(at).await;
                            at
                        }
                        None => tokio::time::Instant::now(),
                    };
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
        Ok(Run {
            lat,
            wall: started.elapsed(),
            cpu: None,
        })
    }
}

/// What the audit log of a governed run holds once it stopped: (leaves, checkpoints).
async fn audit_totals(embedded: &Embedded) -> anyhow::Result<Option<(u64, usize)>> {
    let Some(log) = &embedded.audit else {
        return Ok(None);
    };
    Ok(Some((log.size().await?, log.checkpoints().await?.len())))
}

/// Which admission step is measured.
#[derive(Clone, Copy, Debug)]
enum AdmissionSetup {
    /// No rate limits or budgets, no audit log.
    Off,
    /// Rate limits and a budget.
    Governed,
    /// Rate limits, a budget and the audit log as `agentplane dev` keeps it (pipelined writes,
    /// leaves fsynced by checkpoints).
    Audited,
    /// Rate limits, a budget and the audit log with each write waiting for its fsynced leaf.
    AuditedSynced,
}

impl AdmissionSetup {
    fn label(self) -> &'static str {
        match self {
            AdmissionSetup::Off => "policy off",
            AdmissionSetup::Governed => "policy on (rate limits + budget)",
            AdmissionSetup::Audited => "policy on + audit log (as agentplane dev keeps it)",
            AdmissionSetup::AuditedSynced => "policy on + audit log, waiting for each fsynced leaf",
        }
    }
}

/// Times `controller::reconcile` taking `n` Pending tasks to Queued one after another over the
/// embedded store and queue: re-verification of the envelope, the policy (against a ledger when it
/// governs), the enqueue and the status write (and its audit appends).
async fn admission_latency(setup: AdmissionSetup, n: usize) -> anyhow::Result<Figures> {
    let dir = scratch_dir("admission");
    std::fs::create_dir_all(&dir)?;
    let result = admission_in(&dir, setup, n).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn admission_in(dir: &Path, setup: AdmissionSetup, n: usize) -> anyhow::Result<Figures> {
    let db = Db::open(&dir.join("agentplane.sqlite"))?;
    let mut store: DynStore = SqliteStore::new(db.clone(), "bench");
    let mut log = None;
    if let AdmissionSetup::Audited | AdmissionSetup::AuditedSynced = setup {
        let signer = Ed25519Signer::load_or_create(&dir.join("audit.key"))?;
        let mut config =
            AuditLogConfig::new(dir.join("audit.sqlite"), "agentplane.dev/audit/bench");
        let synced = matches!(setup, AdmissionSetup::AuditedSynced);
        config.fsync_appends = synced;
        let l = AuditLog::open(config, Arc::new(signer)).await?;
        store = if synced {
            AuditedStore::new(store, l.clone())
        } else {
            AuditedStore::pipelined(store, l.clone())
        };
        log = Some(l);
    }
    let queue = SqliteQueue::new(db, "tasks", None);
    let policy = match setup {
        AdmissionSetup::Off => default_policy(),
        AdmissionSetup::Governed | AdmissionSetup::Audited | AdmissionSetup::AuditedSynced => {
            governed_policy()
        }
    };
    store.put_policy(policy.clone()).await?;
    let device = DeviceIdentity::generate("bench-0")?;
    store
        .put_device(
            "bench-0",
            agentplane_api::device::EdgeDeviceSpec {
                public_keys: vec![device.public_key()],
                owner: "bench".into(),
                allowed_intents: vec![],
                revoked: false,
            },
        )
        .await?;
    let mut ledger = Ledger::rebuild(std::iter::empty(), Some(&policy), jiff::Timestamp::now());
    let mut lat = Vec::with_capacity(n);
    let mut busy = Duration::ZERO;
    for seq in 1..=n as u64 {
        let payload = device.intent(seq, INTENT, "benchmark prompt with a few words");
        let envelope = device.sign(&payload)?;
        let admitted = store
            .admit(NewTask {
                id: payload.task_id.clone(),
                spec: AgentTaskSpec::for_payload(envelope, &payload),
                seq,
                trace_id: None,
            })
            .await?;
        let Admission::Created(task) = admitted else {
            anyhow::bail!("task {seq} was not created: {admitted:?}");
        };
        let t = Instant::now();
        let (outcome, _) = reconcile_with_ledger(&*store, &*queue, &task, &mut ledger).await?;
        let took = t.elapsed();
        anyhow::ensure!(
            outcome == Outcome::Moved(TaskPhase::Queued),
            "admission of task {seq}: {outcome:?}"
        );
        busy += took;
        lat.push(took);
    }
    // `busy` as the wall time: the rate is admissions per second spent admitting, without the
    // set-up (signing, storing the task) around each step.
    if let Some(l) = log {
        l.close().await?;
    }
    Ok(figures(lat, busy))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The submit -> Succeeded latencies of one kind of run, per governance mode.
#[derive(Default)]
struct Series {
    /// Every round's latencies and wall time, pooled per mode.
    pooled: [(Vec<Duration>, Duration); 4],
    /// p99 of each mode in each round: the ratio of on and off within a round is less exposed to a
    /// neighbour's load on a shared machine than the pooled figures.
    round_p99: Vec<[Duration; 4]>,
    /// CPU seconds the whole process (runtime and load generator) used in the runs, and the tasks
    /// they ran, per mode.
    cpu: [Option<(f64, usize)>; 4],
    /// A CPU reading of the mode failed (`/proc` unreadable).
    cpu_unreadable: [bool; 4],
}

impl Series {
    /// CPU milliseconds per task of `governance`, when every reading worked.
    fn cpu_per_task(&self, governance: Governance) -> Option<f64> {
        let (s, n) = self.cpu[governance as usize]?;
        (n > 0).then(|| s * 1000.0 / n as f64)
    }

    fn add(&mut self, round: usize, governance: Governance, run: Run) {
        let Run { lat, wall, cpu } = run;
        let i = governance as usize;
        match cpu {
            Some(more) if !self.cpu_unreadable[i] => {
                let (s, n) = self.cpu[i].unwrap_or((0.0, 0));
                self.cpu[i] = Some((s + more, n + lat.len()));
            }
            // One missing reading would make the sum a lie: show none.
            _ => {
                self.cpu_unreadable[i] = true;
                self.cpu[i] = None;
            }
        }
        if self.round_p99.len() <= round {
            self.round_p99.resize(round + 1, [Duration::ZERO; 4]);
        }
        self.round_p99[round][governance as usize] = figures(lat.clone(), wall).p99;
        let slot = &mut self.pooled[governance as usize];
        slot.0.extend(lat);
        slot.1 += wall;
    }

    fn figures(&self) -> [Figures; 4] {
        self.pooled.clone().map(|(lat, wall)| figures(lat, wall))
    }

    /// Prints every mode and the on : off comparison the goal is about.
    fn report(&self) {
        let runs = self.figures();
        let (off, on) = (
            &runs[Governance::Off as usize],
            &runs[Governance::On as usize],
        );
        let off_cpu = self.cpu_per_task(Governance::Off);
        for governance in MODES {
            let f = &runs[governance as usize];
            let cpu = match (self.cpu_per_task(governance), off_cpu) {
                (Some(c), Some(o)) => {
                    format!(", CPU {c:.3} ms/task (x{:.3} of off)", c / o.max(1e-9))
                }
                _ => String::new(),
            };
            println!(
                "    {}: {:.0} tasks/s, p50 {:.2} ms, p99 {:.2} ms (p99 x{:.3} of off){cpu}",
                governance.label(),
                f.per_sec,
                ms(f.p50),
                ms(f.p99),
                f.p99.as_secs_f64() / off.p99.as_secs_f64().max(1e-9),
            );
        }
        let p99_ratio = on.p99.as_secs_f64() / off.p99.as_secs_f64().max(1e-9);
        println!(
            "    governance p99 ratio on : off = {p99_ratio:.3} ({:+.1}% ; goal < +10%), tasks/s ratio {:.3}, p50 ratio {:.3}",
            (p99_ratio - 1.0) * 100.0,
            on.per_sec / off.per_sec.max(1e-9),
            on.p50.as_secs_f64() / off.p50.as_secs_f64().max(1e-9),
        );
        let mut per_round: Vec<f64> = self
            .round_p99
            .iter()
            .map(|r| {
                r[Governance::On as usize].as_secs_f64()
                    / r[Governance::Off as usize].as_secs_f64().max(1e-9)
            })
            .collect();
        let shown: Vec<String> = per_round.iter().map(|r| format!("{r:.3}")).collect();
        per_round.sort_by(f64::total_cmp);
        println!(
            "    p99 ratio on : off per round: [{}], median {:.3}",
            shown.join(", "),
            per_round.get(per_round.len() / 2).copied().unwrap_or(0.0)
        );
    }
}

/// One runtime of `governance`: the closed-loop run (with the CPU it took), then the paced one
/// (seqs continue).
async fn run_mode(args: &BenchArgs, governance: Governance) -> anyhow::Result<(Runtime, Run, Run)> {
    let rt = start(args, governance).await?;
    let cpu_before = process_cpu();
    let mut closed = rt
        .tasks(args.tasks, 1, None)
        .await
        .with_context(|| format!("closed loop, {}", governance.label()))?;
    closed.cpu = cpu_before.zip(process_cpu()).map(|(a, b)| b - a);
    let paced = rt
        .tasks(args.tasks, args.tasks as u64 + 1, Some(args.rate))
        .await
        .with_context(|| format!("paced at {}/s, {}", args.rate, governance.label()))?;
    Ok((rt, closed, paced))
}

/// One measured run: latencies, wall time, and the process's CPU seconds when measured (the
/// closed-loop runs only: `run_mode` reads it around them).
struct Run {
    lat: Vec<Duration>,
    wall: Duration,
    cpu: Option<f64>,
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of tasks per second, not {}",
        args.rate
    );
    let concurrency = args.concurrency.max(1);
    let rounds = args.rounds.max(1);
    let mut floor = None;
    let mut audit_seen = None;
    let (mut closed, mut paced) = (Series::default(), Series::default());
    if let Some(only) = args.only {
        for round in 0..rounds {
            let (rt, c, p) = run_mode(&args, only).await?;
            rt.stop().await;
            closed.add(round, only, c);
            paced.add(round, only, p);
        }
        let (c, p) = (
            &closed.figures()[only as usize],
            &paced.figures()[only as usize],
        );
        let cpu = closed
            .cpu_per_task(only)
            .map_or(String::new(), |c| format!(", CPU {c:.3} ms/task"));
        println!(
            "{} only, {} tasks x {rounds} rounds: closed loop {:.0} tasks/s, p50 {:.2} ms, p99 {:.2} ms{cpu}; paced at {}/s: p50 {:.2} ms, p99 {:.2} ms",
            only.label().trim(),
            args.tasks,
            c.per_sec,
            ms(c.p50),
            ms(c.p99),
            args.rate,
            ms(p.p50),
            ms(p.p99)
        );
        return Ok(());
    }
    for round in 0..rounds {
        for governance in MODES {
            let (rt, c, p) = run_mode(&args, governance)
                .await
                .with_context(|| format!("round {round}"))?;
            if floor.is_none() {
                floor = Some(rt.floor(args.tasks).await?);
            }
            closed.add(round, governance, c);
            paced.add(round, governance, p);
            let totals = audit_totals(&rt.embedded).await?;
            rt.stop().await;
            if totals.is_some() {
                audit_seen = totals;
            }
        }
    }
    let runs = closed.figures();
    let (off, on) = (
        &runs[Governance::Off as usize],
        &runs[Governance::On as usize],
    );
    let floor = floor.unwrap_or(Figures {
        per_sec: 0.0,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
    });

    let audit_dir = scratch_dir("audit");
    std::fs::create_dir_all(&audit_dir)?;
    let audit_one = agentplane::audit::bench::bench_append_and_checkpoint(
        &audit_dir.join("1"),
        args.audit_events,
        256,
        1,
    )
    .await?;
    let audit_many = agentplane::audit::bench::bench_append_and_checkpoint(
        &audit_dir.join("n"),
        args.audit_events,
        256,
        concurrency,
    )
    .await?;
    let _ = std::fs::remove_dir_all(&audit_dir);

    let mut admission = Vec::new();
    for setup in [
        AdmissionSetup::Off,
        AdmissionSetup::Governed,
        AdmissionSetup::Audited,
        AdmissionSetup::AuditedSynced,
    ] {
        admission.push((setup, admission_latency(setup, args.admissions).await?));
    }

    println!(
        "embedded runtime, builtin:echo, {} tasks x {} rounds per mode and load, {} devices, {} workers",
        args.tasks, rounds, concurrency, args.workers
    );
    println!(
        "  submit -> Succeeded, closed loop (each device's next intent as soon as its last finished: saturation):"
    );
    closed.report();
    println!("    (goal >= 1000 tasks/s, p99 < 50 ms)");
    println!(
        "  submit -> Succeeded, paced at {}/s (latency from each intent's scheduled time):",
        args.rate
    );
    paced.report();
    println!(
        "  floor (GET /healthz): {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
        floor.per_sec,
        ms(floor.p50),
        ms(floor.p99)
    );
    println!(
        "  ratio tasks/s : floor req/s = {:.3} (governance off), {:.3} (on)",
        off.per_sec / floor.per_sec.max(1e-9),
        on.per_sec / floor.per_sec.max(1e-9)
    );
    if let Some((leaves, checkpoints)) = audit_seen {
        println!(
            "  audit log of the last governed runtime: {leaves} leaves for {} tasks (closed loop + paced; {:.1} per task), {checkpoints} signed checkpoints",
            2 * args.tasks,
            leaves as f64 / (2 * args.tasks).max(1) as f64
        );
    }
    println!("audit log alone (fsynced appends, Ed25519 checkpoints):");
    for b in [&audit_one, &audit_many] {
        println!(
            "  {} writer(s): {:.0} appends/s, append p50 {:.3} ms p99 {:.3} ms, checkpoint {:.3} ms every {}, cost per event {:.3} ms",
            b.concurrency,
            b.appends_per_sec,
            ms(b.append_p50),
            ms(b.append_p99),
            ms(b.checkpoint_mean),
            b.checkpoint_every,
            ms(b.per_event)
        );
    }
    println!(
        "admission step (controller::reconcile, Pending -> Queued, {} tasks each):",
        args.admissions
    );
    let base = admission
        .first()
        .map(|(_, f)| (f.p50, f.p99))
        .unwrap_or_default();
    for (setup, f) in &admission {
        println!(
            "  {}: p50 {:.3} ms, p99 {:.3} ms ({:.0} admissions/s); p50 ratio to policy off {:.3}, p99 ratio {:.3}",
            setup.label(),
            ms(f.p50),
            ms(f.p99),
            f.per_sec,
            f.p50.as_secs_f64() / base.0.as_secs_f64().max(1e-9),
            f.p99.as_secs_f64() / base.1.as_secs_f64().max(1e-9),
        );
    }
    Ok(())
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat` (ticks of
/// 10 ms; a closed-loop run uses a few hundred). `None` where that file is missing or unreadable.
fn process_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line; 11 and 12 after the name.
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}
