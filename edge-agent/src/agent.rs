//! `run`: the long-lived agent. Opens the key and the outbox, serves the local UI, and drains the outbox
//! to the gateway once one is configured (picking up an enrollment made while it runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::capture::{Capturer, LocalPolicy};
use crate::config::{AgentState, ConfigError, Paths, derived_device_id};
use crate::gateway::{GatewayClient, GatewayError};
use crate::identity::{FileKeySource, IdentityError, KeySource};
use crate::local_model::{LocalModel, LocalModelConfig, LocalModelError};
use crate::local_runner::LocalRunner;
use crate::outbox::{Outbox, OutboxConfig, OutboxError};
use crate::sender::{Link, Sender, SenderConfig};
use crate::ui::{UiState, allowed_hosts, router};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to serve the local UI on non-loopback address {0}: it has no authentication")]
    NotLoopback(SocketAddr),
    #[error(transparent)]
    LocalModel(#[from] LocalModelError),
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub paths: Paths,
    pub listen: SocketAddr,
    pub gateway: Option<String>,
    pub device_id: Option<String>,
    pub user: Option<String>,
    pub max_outbox: u64,
    pub keep_finished: u64,
    pub reset_outbox: bool,
    pub sender: SenderConfig,
    /// The device's local model (`--local-model`); private intents run there.
    pub local_model: Option<LocalModelConfig>,
}

/// Opens the outbox; with `reset` a damaged one is moved aside first (never without it).
pub fn open_outbox(paths: &Paths, max: u64, keep: u64, reset: bool) -> Result<Outbox, OutboxError> {
    let mut cfg = OutboxConfig::new(&paths.outbox);
    cfg.max_unfinished = max;
    cfg.keep_finished = keep;
    match Outbox::open(cfg.clone()) {
        Err(OutboxError::Corrupt { path, detail }) if reset => {
            let aside = Outbox::move_aside(&path)?;
            tracing::warn!(damaged = %detail, kept_at = %aside.display(), "outbox was damaged; moved aside and starting a fresh one");
            eprintln!(
                "agentplane-edge: the damaged outbox was moved to {}; a fresh outbox was created. Intents that were in it were not sent; inspect that file to recover them.",
                aside.display()
            );
            // The gateway remembers the sequence numbers the lost outbox used and refuses any at or below
            // its last one. Without the old file we cannot know them, so restart above any count a device
            // could have reached: the clock in milliseconds (far above a real outbox's numbers; a clock
            // set far in the past is the one case where `enroll` is needed to learn `lastSeq`).
            let mut fresh = cfg;
            fresh.seq_floor = Some(jiff::Timestamp::now().as_millisecond().max(1) as u64);
            Outbox::open(fresh)
        }
        other => other,
    }
}

pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    if !opts.listen.ip().is_loopback() {
        return Err(RunError::NotLoopback(opts.listen));
    }
    let keys = FileKeySource::new(&opts.paths.key_file);
    let signer = keys.load_or_create()?;
    let mut state = AgentState::load(&opts.paths.state_file)?;
    let device_id = pin_device_id(&opts.paths, &mut state, signer.key_id())?;
    let outbox = open_outbox(
        &opts.paths,
        opts.max_outbox,
        opts.keep_finished,
        opts.reset_outbox,
    )?;
    let link = Arc::new(Link::default());
    let wake = Arc::new(Notify::new());
    let local_wake = Arc::new(Notify::new());
    // Checked before serving: a far or malformed --local-model is a startup error, not a later surprise.
    let local_model = opts.local_model.clone().map(LocalModel::new).transpose()?;
    let mut policy = opts.sender.policy.clone();
    policy.local_model = local_model.is_some();
    policy.state_file = Some(opts.paths.state_file.clone());
    let capturer = Capturer {
        outbox: outbox.clone(),
        signer: signer.clone(),
        device_id: device_id.clone(),
        default_user: opts
            .user
            .clone()
            .or_else(|| state.owner.clone())
            .unwrap_or_else(|| device_id.clone()),
        policy,
    };

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: opts.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RunError::Listen {
        addr: opts.listen,
        source,
    })?;
    let ui = router(UiState {
        capturer,
        link: link.clone(),
        wake: wake.clone(),
        local_wake: local_wake.clone(),
        allowed_hosts: Arc::new(allowed_hosts(local)),
    });

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (outbox, signer, link, wake, opts) = (
            outbox.clone(),
            signer.clone(),
            link.clone(),
            wake.clone(),
            opts.clone(),
        );
        tasks.spawn(async move {
            let gateway = wait_for_gateway(&opts).await;
            let client = match GatewayClient::new(&gateway) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "not sending: bad gateway URL");
                    return;
                }
            };
            tracing::info!(gateway = %client.base(), device_id = %device_id, "sending to gateway");
            link.set_gateway(client.base());
            let sender = Sender {
                outbox,
                client,
                signer,
                device_id,
                cfg: opts.sender.clone(),
                link,
                wake,
                accepted: Arc::new(Notify::new()),
            };
            let tracker = sender.clone();
            tokio::join!(sender.run_submit_loop(), tracker.run_track_loop());
        });
    }
    match &local_model {
        Some(m) => {
            tracing::info!(endpoint = %m.endpoint(), "private intents run on the local model")
        }
        None => tracing::info!(
            "no --local-model: private intents are refused (regulated ones too when the policy says local)"
        ),
    }
    tasks.spawn(
        LocalRunner {
            outbox: outbox.clone(),
            model: local_model,
            wake: local_wake,
            backoff: opts.sender.backoff,
        }
        .run(),
    );
    {
        let outbox = outbox.clone();
        let keep = opts.keep_finished;
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(600)).await;
                match outbox.prune(keep).await {
                    Ok(n) if n > 0 => tracing::info!(removed = n, "pruned finished entries"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "prune failed"),
                }
            }
        });
    }

    // Scripts and tests read this line to find the port when listening on :0.
    println!("agentplane-edge listening on http://{local}");
    tracing::info!(addr = %local, outbox = %outbox.path().display(), "local UI ready");
    let served = axum::serve(listener, ui)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    tasks.abort_all();
    served.map_err(|source| RunError::Listen {
        addr: local,
        source,
    })
}

/// The gateway from the flags, or from the state file once `enroll` (maybe in another process) wrote it.
async fn wait_for_gateway(opts: &RunOptions) -> String {
    if let Some(g) = &opts.gateway {
        return g.clone();
    }
    let mut warned = false;
    loop {
        match AgentState::load(&opts.paths.state_file) {
            Ok(AgentState {
                gateway: Some(g), ..
            }) => return g,
            Ok(_) if !warned => {
                tracing::warn!(
                    "not enrolled yet: intents are kept in the outbox until `agentplane-edge enroll` runs"
                );
                warned = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read agent state"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down; the outbox keeps everything not yet delivered");
}

/// The device id intents are signed for. It is recorded on first use, because intents captured before
/// enrollment carry it in their signed payload: changing it later would strand them.
pub fn pin_device_id(
    paths: &Paths,
    state: &mut AgentState,
    key_id: &str,
) -> Result<String, ConfigError> {
    if let Some(id) = &state.device_id {
        return Ok(id.clone());
    }
    let id = derived_device_id(key_id);
    state.device_id = Some(id.clone());
    state.save(&paths.state_file)?;
    Ok(id)
}

/// Exposed for `submit`/`status`: the capturer for a one-shot command.
pub fn one_shot_capturer(
    paths: &Paths,
    outbox: Outbox,
    user: Option<String>,
    policy: LocalPolicy,
) -> Result<Capturer, RunError> {
    let keys = FileKeySource::new(&paths.key_file);
    let signer = keys.load_or_create()?;
    let mut state = AgentState::load(&paths.state_file)?;
    let device_id = pin_device_id(paths, &mut state, signer.key_id())?;
    Ok(Capturer {
        outbox,
        signer,
        default_user: user
            .or_else(|| state.owner.clone())
            .unwrap_or_else(|| device_id.clone()),
        device_id,
        policy,
    })
}
