//! `cargo xtask <task>`; see `cargo xtask --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use xtask::images;

#[derive(Parser)]
#[command(about = "agentplane build tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the OCI images (OCI image layouts with an SPDX SBOM) of agentplane and agentplane-edge.
    Images {
        /// Cargo profile of the binaries packed.
        #[arg(long, default_value = "release")]
        profile: String,
        /// Where the layouts go (one directory per image).
        #[arg(long, default_value = "target/images")]
        out: PathBuf,
        /// Pack the binaries already built instead of running `cargo build` first.
        #[arg(long)]
        no_build: bool,
        /// Only these images (agentplane, agentplane-edge).
        #[arg(long = "image")]
        only: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().task {
        Task::Images {
            profile,
            out,
            no_build,
            only,
        } => {
            let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("xtask lives one level below the workspace root")
                .to_path_buf();
            let out = if out.is_absolute() {
                out
            } else {
                workspace.join(out)
            };
            let built = images::build(&images::Options {
                workspace,
                profile,
                out,
                build: !no_build,
                source_date_epoch: images::source_date_epoch()?,
                only,
            })?;
            for image in built {
                println!(
                    "{}\t{}\tmanifest {}\tindex {}\tsbom {}",
                    image.reference,
                    image.layout.display(),
                    image.manifest_digest,
                    image.index_digest,
                    image.sbom_digest
                );
            }
        }
    }
    Ok(())
}
