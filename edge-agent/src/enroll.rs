//! Enrollment and key rotation against the gateway.
//!
//! Enrolling is idempotent: the gateway answers `alreadyEnrolled` for the same device and key, and we only
//! record state after it answered. Rotation is two-phase so the device is never left with a key the
//! gateway does not know: stage a new key, enroll it, and only then make it current (the old key is kept,
//! and envelopes already signed with it stay valid while the gateway keeps it registered).

use agentplane_api::wire::{EnrollRequest, EnrollResponse};
use agentplane_api::{KeyAlgorithm, PublicKey};

use crate::config::{AgentState, ConfigError, Paths, derived_device_id};
use crate::gateway::{GatewayClient, GatewayError};
use crate::identity::{DeviceSigner, IdentityError, KeySource};
use crate::outbox::{Outbox, OutboxError};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("enrollment failed: {0}")]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("invalid device id: {0}")]
    DeviceId(String),
    #[error("the gateway enrolled device {got:?} but we asked for {asked:?}")]
    Mismatch { asked: String, got: String },
    #[error("no gateway configured: pass --gateway (or enroll first)")]
    NoGateway,
    #[error("this device is not enrolled yet: run `agentplane-edge enroll` first")]
    NotEnrolled,
    #[error(
        "this device already signs intents as {current:?} and {pending} of them are waiting in the outbox; enrolling as {requested:?} would strand them. Enroll as {current:?}, or deliver them first"
    )]
    DeviceIdChange {
        current: String,
        requested: String,
        pending: u64,
    },
}

pub struct EnrollOptions {
    pub gateway: Option<String>,
    pub token: String,
    pub device_id: Option<String>,
    pub owner: Option<String>,
}

/// Registers the current key (created if needed). Safe to run again.
pub async fn enroll(
    paths: &Paths,
    keys: &dyn KeySource,
    outbox: &Outbox,
    opts: EnrollOptions,
) -> Result<EnrollResponse, EnrollError> {
    let mut state = AgentState::load(&paths.state_file)?;
    let signer = keys.load_or_create()?;
    if let (Some(current), Some(requested)) = (&state.device_id, &opts.device_id)
        && current != requested
    {
        let c = outbox.counts().await?;
        let unfinished = c.pending + c.held;
        if unfinished > 0 {
            return Err(EnrollError::DeviceIdChange {
                current: current.clone(),
                requested: requested.clone(),
                pending: unfinished,
            });
        }
    }
    let resp = register(&mut state, signer.as_ref(), &opts).await?;
    if let Some(last) = resp.last_seq {
        // After a reinstall or an outbox reset the gateway remembers sequence numbers we no longer do.
        outbox.raise_next_seq(last.saturating_add(1)).await?;
    }
    state.save(&paths.state_file)?;
    Ok(resp)
}

/// Stages a new key, registers it at the gateway (signed by the current key and by the new one),
/// then makes it current. Re-running after a failure reuses the staged key. The old key stays
/// registered, so intents it signed that are still in the outbox are delivered; with
/// `retire_old_after_secs` the gateway sets its `notAfter` that far ahead.
pub async fn rotate(
    paths: &Paths,
    keys: &dyn KeySource,
    retire_old_after_secs: Option<u64>,
) -> Result<(String, String), EnrollError> {
    let state = AgentState::load(&paths.state_file)?;
    let gateway = state.gateway.clone().ok_or(EnrollError::NoGateway)?;
    let device_id = state.device_id.clone().ok_or(EnrollError::NotEnrolled)?;
    let old = keys.load_or_create()?;
    let next = keys.stage_next()?;
    let client = GatewayClient::new(&gateway)?;
    client
        .add_key(
            &device_id,
            old.as_ref(),
            next.as_ref(),
            retire_old_after_secs,
        )
        .await?;
    // Committed only after the gateway registered it: a crash before this leaves a staged key the
    // gateway already knows, and the next `rotate-key` commits it (adding it again is harmless).
    let new = keys.commit_next()?;
    Ok((old.key_id().to_owned(), new.key_id().to_owned()))
}

async fn register(
    state: &mut AgentState,
    signer: &dyn DeviceSigner,
    opts: &EnrollOptions,
) -> Result<EnrollResponse, EnrollError> {
    let gateway = opts
        .gateway
        .clone()
        .or_else(|| state.gateway.clone())
        .ok_or(EnrollError::NoGateway)?;
    let device_id = opts
        .device_id
        .clone()
        .or_else(|| state.device_id.clone())
        .unwrap_or_else(|| derived_device_id(signer.key_id()));
    agentplane_api::intent::check_dns_label("deviceId", &device_id)
        .map_err(|e| EnrollError::DeviceId(e.to_string()))?;
    let owner = opts
        .owner
        .clone()
        .or_else(|| state.owner.clone())
        .unwrap_or_else(|| device_id.clone());
    let client = GatewayClient::new(&gateway)?;
    let req = EnrollRequest {
        join_token: opts.token.clone(),
        device_id: device_id.clone(),
        owner: owner.clone(),
        public_key: PublicKey {
            id: signer.key_id().to_owned(),
            alg: KeyAlgorithm::Ed25519,
            key: agentplane_api::envelope::encode_public_key(&signer.public_key()),
            not_after: None,
        },
    };
    let resp = client.enroll(&req).await?;
    if resp.device_id != device_id {
        return Err(EnrollError::Mismatch {
            asked: device_id,
            got: resp.device_id,
        });
    }
    state.gateway = Some(client.base().to_owned());
    state.device_id = Some(device_id);
    state.owner = Some(owner);
    state.namespace = Some(resp.namespace.clone());
    // Every enrollment answer carries the current edge policy: re-enrolling is how a device refreshes it.
    state.edge_policy = resp.edge_policy;
    if !state.is_enrolled_with(signer.key_id()) {
        state.enrolled_keys.push(signer.key_id().to_owned());
    }
    Ok(resp)
}
