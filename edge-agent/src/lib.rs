//! agentplane's edge agent: device identity, signed intents, a durable offline outbox, the sender that
//! drains it to the gateway, and the local UI. `main.rs` is a thin CLI over these modules.

pub mod agent;
pub mod backoff;
pub mod capture;
pub mod config;
pub mod enroll;
pub mod gateway;
pub mod identity;
pub mod install;
pub mod local_model;
pub mod local_runner;
pub mod outbox;
pub mod sender;
pub mod telemetry;
pub mod ui;
