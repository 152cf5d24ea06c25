//! Build tasks for the agentplane workspace (`cargo xtask ...`, see `.cargo/config.toml`).
//!
//! `images`: OCI images of the `agentplane` and `agentplane-edge` binaries, written as OCI image
//! layouts with an SPDX SBOM, byte-for-byte reproducible. See docs/architecture.md, "Container
//! images".

pub mod images;
