//! `agentplane-edge`: the edge agent that runs on a device.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentplane_api::PrivacyLevel;
use agentplane_api::device::SEQ_WINDOW;
use agentplane_edge::agent::{self, RunError, RunOptions, open_outbox};
use agentplane_edge::backoff::Backoff;
use agentplane_edge::capture::{CaptureError, IntentRequest, LocalPolicy};
use agentplane_edge::config::{AgentState, Paths, default_data_dir};
use agentplane_edge::enroll::{self, EnrollError, EnrollOptions};
use agentplane_edge::identity::{FileKeySource, KeySource as _};
use agentplane_edge::install::{self, InstallOptions};
use agentplane_edge::local_model::LocalModelConfig;
use agentplane_edge::outbox::{Entry, EntryState, OutboxError, RunsOn};
use agentplane_edge::sender::{DEFAULT_MAX_IN_FLIGHT, SenderConfig};
use agentplane_edge::telemetry;
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// Exit status for "the outbox is damaged": systemd's unit does not restart on it (no crash loop).
const EXIT_CORRUPT_OUTBOX: u8 = 78;

/// agentplane edge agent: owns the local UI, signs each intent with the device key and keeps it in a
/// durable outbox until the gateway has it.
#[derive(Parser, Debug)]
#[command(name = "agentplane-edge", version, about, long_about = None)]
struct Cli {
    /// Directory holding the key, the outbox and the agent state
    /// [default: /var/lib/agentplane-edge as root, else $XDG_DATA_HOME/agentplane-edge].
    #[arg(long, env = "AGENTPLANE_EDGE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The device key file [default: <data-dir>/device.key].
    #[arg(long, env = "AGENTPLANE_EDGE_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, env = "AGENTPLANE_EDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: local UI on 127.0.0.1:7420 and the outbox sender.
    Run(RunArgs),
    /// Register this device's key with a gateway using a join token (safe to repeat).
    Enroll {
        /// Gateway base URL, e.g. http://127.0.0.1:8787 [default: the one enrolled with before].
        #[arg(long, env = "AGENTPLANE_GATEWAY")]
        gateway: Option<String>,
        /// Join token from the platform operator.
        #[arg(long, env = "AGENTPLANE_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Device name (a DNS-1123 label) [default: derived from the key].
        #[arg(long, env = "AGENTPLANE_EDGE_DEVICE_ID")]
        device_id: Option<String>,
        /// Owner recorded on the device [default: the device id].
        #[arg(long)]
        owner: Option<String>,
    },
    /// Create a new device key, register it with the gateway, then make it current (the old key is kept).
    RotateKey {
        /// Retire the old key this many seconds from now (at most 30 days). Without it the old key
        /// stays valid, so intents it signed that are still queued offline are delivered.
        #[arg(long)]
        retire_old_after: Option<u64>,
    },
    /// Capture, sign and queue one intent from the command line (works offline, with or without `run`).
    Submit {
        /// Intent type, e.g. summarize.
        #[arg(long = "type", default_value = "summarize")]
        kind: String,
        /// The prompt; `-` reads it from stdin.
        #[arg(long)]
        prompt: String,
        #[arg(long, value_enum, default_value_t = Privacy::Public)]
        privacy: Privacy,
        /// User id [default: the enrolled owner].
        #[arg(long, env = "AGENTPLANE_EDGE_USER")]
        user: Option<String>,
        /// Allow a private intent to leave the device (when no local model is configured).
        #[arg(long)]
        allow_private_upload: bool,
        /// The running agent's local model (same as `run --local-model`): private intents are queued
        /// for it instead of refused.
        #[arg(long, env = "AGENTPLANE_EDGE_LOCAL_MODEL")]
        local_model: Option<String>,
        /// GPUs the task needs (0: none); a cluster runs a GPU task as a Job on its GPU pool.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=agentplane_api::intent::MAX_GPUS as i64))]
        gpu: u32,
        /// Wait until the task finishes (needs a running agent) and print its result.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// Show the outbox and the state of submitted tasks.
    Status {
        /// One task to show.
        task_id: Option<String>,
        /// Output JSON.
        #[arg(long)]
        json: bool,
        /// How many recent entries to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Install the agent as a hardened systemd service: config, key, enrollment, unit (safe to repeat).
    Install {
        /// Filesystem root to install under (for images and tests); systemctl runs only when it is `/`.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Where the binary goes (the unit's ExecStart).
        #[arg(long, default_value = "/usr/local/bin/agentplane-edge")]
        bin_path: PathBuf,
        /// Leave the binary where it is (a package already installed it at --bin-path).
        #[arg(long)]
        no_copy_binary: bool,
        /// Gateway to enroll with (together with --token; or enroll later).
        #[arg(long, env = "AGENTPLANE_GATEWAY")]
        gateway: Option<String>,
        #[arg(long, env = "AGENTPLANE_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long)]
        device_id: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// Local UI address for the service.
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: String,
        /// Run as this existing account instead of a systemd DynamicUser.
        #[arg(long)]
        user: Option<String>,
        /// Do not call systemctl even when the root is `/`.
        #[arg(long)]
        no_systemctl: bool,
    },
    /// Remove the service installed by `install`; the key and outbox are kept unless --purge.
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Also delete the data directory: the device key and any intents not yet delivered.
        #[arg(long)]
        purge: bool,
        #[arg(long)]
        no_systemctl: bool,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the local UI and API (loopback only).
    #[arg(long, env = "AGENTPLANE_EDGE_LISTEN", default_value = "127.0.0.1:7420")]
    listen: SocketAddr,
    /// Gateway base URL [default: the one enrolled with].
    #[arg(long, env = "AGENTPLANE_GATEWAY")]
    gateway: Option<String>,
    /// User id for intents from the UI [default: the enrolled owner].
    #[arg(long, env = "AGENTPLANE_EDGE_USER")]
    user: Option<String>,
    /// Most intents waiting for the gateway; captures beyond it are refused, never dropped.
    #[arg(long, env = "AGENTPLANE_EDGE_MAX_OUTBOX", default_value_t = 100_000)]
    max_outbox: u64,
    /// Finished tasks kept for display.
    #[arg(long, default_value_t = 10_000)]
    keep_finished: u64,
    /// Submissions in flight at once, sent in seq order (1 to 64, the gateway's replay window; 1
    /// keeps arrival order equal to seq order). [default: `maxInFlight` in <data-dir>/agent.json,
    /// else 32]
    #[arg(long, env = "AGENTPLANE_EDGE_MAX_IN_FLIGHT", value_parser = clap::value_parser!(u64).range(1..=SEQ_WINDOW))]
    max_in_flight: Option<u64>,
    /// Let `private` intents leave the device when no --local-model is set (the default refuses them).
    #[arg(long, env = "AGENTPLANE_EDGE_ALLOW_PRIVATE_UPLOAD")]
    allow_private_upload: bool,
    #[command(flatten)]
    local: LocalModelArgs,
    /// If the outbox is damaged, move it aside (kept for inspection) and start a fresh one.
    #[arg(long)]
    reset_outbox: bool,
    /// Longest pause between retries, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    backoff_max_ms: u64,
    /// First retry pause, in milliseconds.
    #[arg(long, default_value_t = 250)]
    backoff_base_ms: u64,
    /// Pause between task status polls, in milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
}

/// The device's local model tier.
#[derive(clap::Args, Debug)]
struct LocalModelArgs {
    /// Base URL of an OpenAI-compatible API on this device (e.g. llama.cpp's server,
    /// http://127.0.0.1:8080/v1). `private` intents run there and never leave the device; so do
    /// `regulated` ones when the enrollment policy says `local`. Loopback addresses only.
    #[arg(long, env = "AGENTPLANE_EDGE_LOCAL_MODEL")]
    local_model: Option<String>,
    /// The `model` name sent to the local model (single-model servers ignore it).
    #[arg(
        long,
        env = "AGENTPLANE_EDGE_LOCAL_MODEL_NAME",
        default_value = "local"
    )]
    local_model_name: String,
    /// Most tokens the local model may generate for one intent.
    #[arg(long, default_value_t = 512)]
    local_model_max_tokens: u32,
    /// Longest one local model call may take, in seconds.
    #[arg(long, default_value_t = 300)]
    local_model_timeout_secs: u64,
}

impl LocalModelArgs {
    fn config(&self) -> Option<LocalModelConfig> {
        self.local_model.as_ref().map(|url| LocalModelConfig {
            url: url.clone(),
            model: self.local_model_name.clone(),
            max_tokens: self.local_model_max_tokens.max(1),
            timeout: Duration::from_secs(self.local_model_timeout_secs.max(1)),
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Privacy {
    Public,
    Regulated,
    Private,
}

impl From<Privacy> for PrivacyLevel {
    fn from(p: Privacy) -> Self {
        match p {
            Privacy::Public => PrivacyLevel::Public,
            Privacy::Regulated => PrivacyLevel::Regulated,
            Privacy::Private => PrivacyLevel::Private,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentplane-edge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: span export, when configured, sends from it.
    let telemetry = {
        let _in = rt.enter();
        match telemetry::init(matches!(cli.log_format, LogFormat::Json), "agentplane-edge") {
            Ok(t) => t,
            Err(e) => {
                eprintln!("agentplane-edge: setting up logs and traces: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let result = rt.block_on(dispatch(cli));
    // Flushes the spans still batched (a one-shot `submit`'s capture too) while the runtime runs.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentplane-edge: {}", describe(&e));
            if is_corrupt_outbox(&e) {
                ExitCode::from(EXIT_CORRUPT_OUTBOX)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text an outer message already carries
/// (several of our errors embed their source's text).
fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Whether the failure is a damaged outbox, however deep it is wrapped (transparent wrappers hide the
/// inner error from `chain()`, so each wrapper is looked into).
fn is_corrupt_outbox(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let outbox = c
            .downcast_ref::<OutboxError>()
            .or_else(|| match c.downcast_ref::<RunError>() {
                Some(RunError::Outbox(o)) => Some(o),
                _ => None,
            })
            .or_else(|| match c.downcast_ref::<EnrollError>() {
                Some(EnrollError::Outbox(o)) => Some(o),
                _ => None,
            })
            .or_else(|| match c.downcast_ref::<CaptureError>() {
                Some(CaptureError::Outbox(o)) => Some(o),
                _ => None,
            });
        matches!(outbox, Some(OutboxError::Corrupt { .. }))
    })
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let paths = Paths::new(
        cli.data_dir.clone().unwrap_or_else(default_data_dir),
        cli.key_file.clone(),
    );
    match cli.command {
        Command::Run(args) => {
            // Flag or environment, else the state file, else the default.
            let max_in_flight = match args.max_in_flight {
                Some(n) => n as usize,
                None => AgentState::load(&paths.state_file)?
                    .max_in_flight()
                    .with_context(|| format!("in {}", paths.state_file.display()))?
                    .unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            };
            let opts = RunOptions {
                paths,
                listen: args.listen,
                gateway: args.gateway,
                device_id: None,
                user: args.user,
                max_outbox: args.max_outbox,
                keep_finished: args.keep_finished,
                reset_outbox: args.reset_outbox,
                sender: SenderConfig {
                    max_in_flight,
                    backoff: Backoff {
                        base: Duration::from_millis(args.backoff_base_ms.max(1)),
                        max: Duration::from_millis(
                            args.backoff_max_ms.max(args.backoff_base_ms).max(1),
                        ),
                    },
                    poll_interval: Duration::from_millis(args.poll_ms.max(50)),
                    policy: LocalPolicy {
                        allow_private_upload: args.allow_private_upload,
                        ..LocalPolicy::default()
                    },
                    ..SenderConfig::default()
                },
                local_model: args.local.config(),
            };
            agent::run(opts).await.context("agent stopped")?;
        }
        Command::Enroll {
            gateway,
            token,
            device_id,
            owner,
        } => {
            let outbox = open_outbox(&paths, u64::MAX, u64::MAX, false)?;
            let keys = FileKeySource::new(&paths.key_file);
            let resp = enroll::enroll(
                &paths,
                &keys,
                &outbox,
                EnrollOptions {
                    gateway,
                    token,
                    device_id,
                    owner,
                },
            )
            .await?;
            println!(
                "{} device {} in namespace {} (key {})",
                if resp.already_enrolled {
                    "already enrolled:"
                } else {
                    "enrolled:"
                },
                resp.device_id,
                resp.namespace,
                keys.load_or_create()?.key_id()
            );
        }
        Command::RotateKey { retire_old_after } => {
            let keys = FileKeySource::new(&paths.key_file);
            let (old, new) = enroll::rotate(&paths, &keys, retire_old_after).await?;
            let kept = match retire_old_after {
                Some(s) => format!("the gateway retires the old key in {s} s"),
                None => "the old key stays registered".to_owned(),
            };
            println!(
                "rotated: {old} -> {new} ({kept}; restart a running agent to sign with the new key)"
            );
        }
        Command::Submit {
            kind,
            prompt,
            privacy,
            user,
            allow_private_upload,
            local_model,
            gpu,
            wait,
            timeout_secs,
        } => {
            let prompt = if prompt == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the prompt from stdin")?;
                s
            } else {
                prompt
            };
            let outbox = open_outbox(&paths, 100_000, u64::MAX, false)?;
            let capturer = agent::one_shot_capturer(
                &paths,
                outbox.clone(),
                user,
                LocalPolicy {
                    allow_private_upload,
                    local_model: local_model.is_some(),
                    state_file: Some(paths.state_file.clone()),
                    ..LocalPolicy::default()
                },
            )?;
            let req = IntentRequest {
                kind,
                prompt,
                privacy_level: privacy.into(),
                user_id: None,
                params: Default::default(),
                gpu,
                model: None,
                consent_scopes: vec!["process".into()],
            };
            let accepted = capturer.capture(req).await?;
            // The first line stays `<task id> seq=<n>`: scripts read it.
            println!("{} seq={}", accepted.task_id, accepted.seq);
            if accepted.runs_on == RunsOn::Device {
                println!("runs on this device's local model; it is never sent");
            }
            if wait {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
                loop {
                    if let Some(e) = outbox.get(&accepted.task_id).await?
                        && matches!(
                            e.state,
                            EntryState::Done | EntryState::Rejected | EntryState::Held
                        )
                    {
                        print_entry(&e);
                        if e.phase.as_deref() != Some("Succeeded") {
                            anyhow::bail!("task {} did not succeed", e.task_id);
                        }
                        break;
                    }
                    if tokio::time::Instant::now() > deadline {
                        anyhow::bail!(
                            "timed out waiting for task {} (it stays queued; is `agentplane-edge run` running?)",
                            accepted.task_id
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Command::Status {
            task_id,
            json,
            limit,
        } => {
            let outbox = open_outbox(&paths, u64::MAX, u64::MAX, false)?;
            let state = AgentState::load(&paths.state_file)?;
            if let Some(id) = task_id {
                let e = outbox
                    .get(&id)
                    .await?
                    .with_context(|| format!("no intent {id} on this device"))?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&e)?);
                } else {
                    print_entry(&e);
                }
                return Ok(());
            }
            let counts = outbox.counts().await?;
            let recent = outbox.recent(limit.clamp(1, 10_000)).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "deviceId": state.device_id,
                        "gateway": state.gateway,
                        "nextSeq": outbox.next_seq().await?,
                        "counts": counts,
                        "recent": recent,
                    }))?
                );
            } else {
                println!(
                    "device {} gateway {}",
                    state.device_id.as_deref().unwrap_or("(not enrolled)"),
                    state.gateway.as_deref().unwrap_or("(none)")
                );
                println!(
                    "pending upload {}  running {}  done {}  rejected {}  kept local {}  queued on device {}",
                    counts.pending,
                    counts.sent,
                    counts.done,
                    counts.rejected,
                    counts.held,
                    counts.local
                );
                for e in recent {
                    print_entry(&e);
                }
            }
        }
        Command::Install {
            root,
            bin_path,
            no_copy_binary,
            gateway,
            token,
            device_id,
            owner,
            listen,
            user,
            no_systemctl,
        } => {
            let systemctl = !no_systemctl && root == std::path::Path::new("/");
            let opts = InstallOptions {
                bin_source: if no_copy_binary {
                    None
                } else {
                    Some(std::env::current_exe().context("locating this binary")?)
                },
                root,
                bin_path,
                gateway,
                token,
                device_id,
                owner,
                listen,
                user,
                systemctl,
            };
            for f in install::install(&opts).await? {
                println!("wrote {}", f.display());
            }
            println!("installed {}", install::UNIT_NAME);
        }
        Command::Uninstall {
            root,
            purge,
            no_systemctl,
        } => {
            let systemctl = !no_systemctl && root == std::path::Path::new("/");
            for f in install::uninstall(&root, purge, systemctl)? {
                println!("removed {}", f.display());
            }
        }
    }
    Ok(())
}

fn print_entry(e: &Entry) {
    let shown = match e.state {
        EntryState::Pending => "Pending upload".to_owned(),
        EntryState::Held => "Kept on device".to_owned(),
        EntryState::Local => "Queued on device".to_owned(),
        EntryState::Rejected => "Rejected".to_owned(),
        EntryState::Sent | EntryState::Done => {
            e.phase.clone().unwrap_or_else(|| "Submitted".into())
        }
    };
    println!(
        "{:>6}  {}  {:<16} {:<6} {}",
        e.seq,
        e.task_id,
        shown,
        e.runs_on.as_str(),
        e.intent_type
    );
    if let Some(r) = &e.result {
        println!("        result: {r}");
    }
    if let Some(r) = &e.reason {
        println!("        reason: {r}");
    }
    if matches!(e.state, EntryState::Pending | EntryState::Local)
        && let Some(err) = &e.last_error
    {
        println!("        last attempt: {err}");
    }
}
