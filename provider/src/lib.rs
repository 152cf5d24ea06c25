//! terraform-provider-agentplane: the agentplane Terraform/OpenTofu provider and the small
//! framework it is built on.

pub mod aws;
pub mod config;
pub mod framework;
pub mod plugin;
pub mod resources;

pub use config::AgentplaneProvider;
