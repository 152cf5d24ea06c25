//! terraform-provider-agentplane: the agentplane Terraform/OpenTofu provider and the small
//! framework it is built on.

pub mod aws;
pub mod config;
pub mod eks;
pub mod framework;
pub mod kube;
pub mod platform_manifests;
pub mod plugin;
pub mod resources;
pub mod timeouts;

pub use config::AgentplaneProvider;
