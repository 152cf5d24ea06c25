//! agentplane's cloud runtime: the device gateway, the controller, the worker, the policy engine and
//! their store and queue backends. The `agentplane` binary wires these into its subcommands.

pub mod audit;
pub mod client;
pub mod cloud;
pub mod controller;
pub mod gateway;
pub mod mcp;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod queue;
pub mod runtime;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod worker;
