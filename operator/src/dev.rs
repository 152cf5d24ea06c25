//! The `dev` and hidden `dev-client` subcommands: configuration (flags > env > file > defaults) and
//! the scripted demo device.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentplane::client::{ClientError, DeviceIdentity, GatewayClient};
use agentplane::gateway::serve::TlsFiles;
use agentplane::gateway::{ApproverCredential, GatewayConfig};
use agentplane::runtime::{Embedded, EmbeddedConfig, default_policy, random_token};
use agentplane::worker::WorkerConfig;
use agentplane_api::AgentPolicySpec;
use agentplane_api::TaskPhase;
use agentplane_api::policy::{EdgePolicy, RegulatedRoute};
use anyhow::Context as _;
use serde::Deserialize;

/// Configuration of `agentplane dev`. Every flag can also come from its environment variable or from
/// the `--config` YAML file (same names, kebab-case); flags and environment win over the file.
#[derive(clap::Args, Debug, Default)]
pub struct DevArgs {
    /// YAML file with any of the options below (e.g. `listen: 127.0.0.1:8787`).
    #[arg(long, env = "AGENTPLANE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8787]. Plain HTTP only on loopback; other addresses
    /// need --tls-cert and --tls-key.
    #[arg(long, env = "AGENTPLANE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory holding the SQLite database [default: .agentplane].
    #[arg(long, env = "AGENTPLANE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Namespace reported to devices [default: default].
    #[arg(long, env = "AGENTPLANE_NAMESPACE")]
    namespace: Option<String>,
    /// One-time enrollment token to accept (repeatable). Without one, a token is generated and printed.
    #[arg(
        long = "join-token",
        env = "AGENTPLANE_JOIN_TOKEN",
        value_delimiter = ','
    )]
    join_tokens: Vec<String>,
    /// Approver credential NAME=TOKEN (repeatable). Without one, a token for `admin` is generated and printed.
    #[arg(
        long = "approver",
        env = "AGENTPLANE_APPROVERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    approvers: Vec<String>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "AGENTPLANE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "AGENTPLANE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest request body in bytes [default: 2097152].
    #[arg(long, env = "AGENTPLANE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Seconds a request (body upload included) may take before a 408 [default: 15].
    #[arg(long, env = "AGENTPLANE_REQUEST_TIMEOUT_SECS")]
    request_timeout_secs: Option<u64>,
    /// Concurrent worker consumers [default: 4].
    #[arg(long, env = "AGENTPLANE_WORKERS")]
    workers: Option<usize>,
    /// Receives before a message goes to the dead-letter queue [default: 3].
    #[arg(long, env = "AGENTPLANE_MAX_RECEIVE_COUNT")]
    max_receive_count: Option<u32>,
    /// Log format: json or text [default: json].
    #[arg(long, env = "AGENTPLANE_LOG_FORMAT")]
    log_format: Option<String>,
    /// Where enrolled devices run `regulated` intents (the seeded policy's `edge.regulated`): local,
    /// cloud or refuse. Applies when the data directory has no policy yet.
    #[arg(long, env = "AGENTPLANE_EDGE_REGULATED", value_parser = parse_regulated)]
    edge_regulated: Option<RegulatedRoute>,
}

fn parse_regulated(s: &str) -> Result<RegulatedRoute, String> {
    match s {
        "local" => Ok(RegulatedRoute::Local),
        "cloud" => Ok(RegulatedRoute::Cloud),
        "refuse" => Ok(RegulatedRoute::Refuse),
        other => Err(format!("{other:?} is not one of local, cloud, refuse")),
    }
}

/// The `--config` file: the same options as the flags.
#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct DevFile {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    namespace: Option<String>,
    #[serde(default)]
    join_tokens: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    request_timeout_secs: Option<u64>,
    workers: Option<usize>,
    max_receive_count: Option<u32>,
    log_format: Option<String>,
    edge_regulated: Option<RegulatedRoute>,
}

pub fn parse_approver(s: &str) -> anyhow::Result<(String, String)> {
    let (name, token) = s
        .split_once('=')
        .with_context(|| "an approver is NAME=TOKEN".to_string())?;
    anyhow::ensure!(
        !name.is_empty() && !token.is_empty(),
        "an approver is NAME=TOKEN"
    );
    Ok((name.to_owned(), token.to_owned()))
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let file: DevFile = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => DevFile::default(),
    };
    let log_format = args
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "json".into());

    let defaults = EmbeddedConfig::default();
    let mut approvers = Vec::new();
    let mut printed_approver = None;
    let approver_specs = if args.approvers.is_empty() {
        file.approvers
    } else {
        args.approvers
    };
    for a in &approver_specs {
        let (name, token) = parse_approver(a)?;
        approvers.push(ApproverCredential::new(name, &token));
    }
    if approvers.is_empty() {
        let token = random_token()?;
        approvers.push(ApproverCredential::new("admin", &token));
        printed_approver = Some(token);
    }
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
    ) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let cfg = EmbeddedConfig {
        listen: args.listen.or(file.listen).unwrap_or(defaults.listen),
        data_dir: args.data_dir.or(file.data_dir).unwrap_or(defaults.data_dir),
        namespace: args
            .namespace
            .or(file.namespace)
            .unwrap_or(defaults.namespace),
        join_tokens: if args.join_tokens.is_empty() {
            file.join_tokens
        } else {
            args.join_tokens
        },
        tls,
        gateway: GatewayConfig {
            max_body_bytes: args
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(defaults.gateway.max_body_bytes),
            request_timeout: args
                .request_timeout_secs
                .or(file.request_timeout_secs)
                .map(Duration::from_secs)
                .unwrap_or(defaults.gateway.request_timeout),
            approvers,
            ..defaults.gateway
        },
        worker: WorkerConfig {
            concurrency: args
                .workers
                .or(file.workers)
                .unwrap_or(defaults.worker.concurrency),
            ..defaults.worker
        },
        max_receive_count: args
            .max_receive_count
            .or(file.max_receive_count)
            .unwrap_or(defaults.max_receive_count),
        initial_policy: args
            .edge_regulated
            .or(file.edge_regulated)
            .map(|regulated| AgentPolicySpec {
                edge: Some(EdgePolicy { regulated }),
                ..default_policy()
            }),
        ..defaults
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Inside the runtime: span export, when configured, sends from it.
    let telemetry = {
        let _in = rt.enter();
        agentplane::telemetry::init(&log_format, "agentplane-dev")
            .context("setting up logs and traces")?
    };
    let result = rt.block_on(async move {
        let embedded = Embedded::start(cfg)
            .await
            .context("starting the embedded runtime")?;
        // Printed to stdout for the person (or script) that started the runtime; never logged.
        println!("agentplane dev listening on {}", embedded.base_url());
        if let Some(t) = &embedded.generated_join_token {
            println!("join token (one-time): {t}");
        }
        if let Some(t) = &printed_approver {
            println!("approver token (admin): {t}");
        }
        println!("approver page: {}/approvals", embedded.base_url());
        wait_for_signal().await;
        tracing::info!("shutting down");
        embedded.stop().await;
        anyhow::Ok(())
    });
    // Flushes the spans still batched while the runtime can still send them.
    telemetry.shutdown();
    result
}

pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[derive(clap::Args, Debug)]
pub struct DevClientArgs {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8787")]
    gateway: String,
    /// Join token to enroll with.
    #[arg(long)]
    join_token: String,
    /// Approver bearer token (to approve the `purchase` intent).
    #[arg(long)]
    approver_token: String,
    /// Device name to enroll as.
    #[arg(long, default_value = "demo-device")]
    device_id: String,
}

pub fn run_client(args: DevClientArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
}

fn phases_line(phases: &[TaskPhase]) -> String {
    phases
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// The scripted device of `make demo`.
async fn demo(args: DevClientArgs) -> anyhow::Result<()> {
    let client = GatewayClient::new(&args.gateway);
    let device = DeviceIdentity::generate(&args.device_id)?;
    let (status, enrolled) = client
        .enroll(&args.join_token, &device, "demo-owner")
        .await?;
    println!(
        "enrolled {} in namespace {} ({status})",
        enrolled.device_id, enrolled.namespace
    );
    let (status, again) = client
        .enroll(&args.join_token, &device, "demo-owner")
        .await?;
    println!(
        "enrolled again: alreadyEnrolled={} ({status})",
        again.already_enrolled
    );

    let script: [(&str, &str, TaskPhase); 4] = [
        (
            "summarize",
            "the quick brown fox jumps over the lazy dog",
            TaskPhase::Succeeded,
        ),
        ("translate", "bonjour tout le monde", TaskPhase::Succeeded),
        (
            "purchase",
            "two tickets to the museum",
            TaskPhase::Succeeded,
        ),
        ("shell", "rm -rf /", TaskPhase::Denied),
    ];
    let mut failures = 0;
    for (seq, (kind, prompt, expected)) in script.into_iter().enumerate() {
        let payload = device.intent(seq as u64 + 1, kind, prompt);
        let envelope = device.sign(&payload)?;
        let accepted = client.submit(&envelope).await?;
        println!(
            "\n[{kind}] submitted task {} (202, phase {})",
            accepted.task_id, accepted.phase
        );
        if seq == 0 {
            let dup = client.submit(&envelope).await?;
            println!(
                "[{kind}] same envelope again: duplicate={} task {}",
                dup.duplicate, dup.task_id
            );
        }
        let mut phases = vec![accepted.phase];
        let mut seen = |v: &agentplane_api::wire::TaskView| {
            if phases.last() != Some(&v.phase) {
                phases.push(v.phase);
            }
        };
        let last = if kind == "purchase" {
            // Wait for the approval gate, then approve as the admin.
            let mut v = client.task(&device, &accepted.task_id).await?;
            for _ in 0..100 {
                if v.phase != TaskPhase::Pending {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                v = client.task(&device, &accepted.task_id).await?;
            }
            seen(&v);
            if v.phase == TaskPhase::AwaitingApproval {
                let decided = client
                    .decide(
                        &args.approver_token,
                        &accepted.task_id,
                        true,
                        Some("demo approval"),
                    )
                    .await?;
                println!(
                    "[{kind}] approved by {}",
                    decided.approval.map(|a| a.approver).unwrap_or_default()
                );
            }
            client.follow(&device, &accepted.task_id, &mut seen).await?
        } else {
            client.follow(&device, &accepted.task_id, &mut seen).await?
        };
        println!("[{kind}] phases seen: {}", phases_line(&phases));
        match (&last.result, &last.reason) {
            (Some(r), _) => println!("[{kind}] result: {r}"),
            (None, Some(reason)) => println!("[{kind}] reason: {reason}"),
            _ => {}
        }
        if let Some(u) = last.usage {
            println!(
                "[{kind}] usage: {} in / {} out tokens, cost {} micros",
                u.input_tokens, u.output_tokens, u.cost_micros
            );
        }
        if last.phase != expected {
            println!(
                "[{kind}] UNEXPECTED: ended {} (expected {expected})",
                last.phase
            );
            failures += 1;
        }
    }
    // A replayed sequence number is refused.
    let replay = device.intent(1, "summarize", "replayed");
    match client.submit(&device.sign(&replay)?).await {
        Err(ClientError::Api { status, body }) => {
            println!("\nreplayed seq 1: {status} {}", body.error.code)
        }
        other => {
            println!("\nreplayed seq 1: UNEXPECTED {other:?}");
            failures += 1;
        }
    }
    anyhow::ensure!(
        failures == 0,
        "{failures} demo step(s) did not end as expected"
    );
    println!("\ndemo complete");
    Ok(())
}
