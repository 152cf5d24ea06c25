//! `terraform-provider-agentplane`: the Terraform/OpenTofu provider binary.
use std::process::ExitCode;

use clap::Parser;
use terraform_provider_agentplane::AgentplaneProvider;
use terraform_provider_agentplane::plugin::{self, Mode, ServeError};

/// Terraform/OpenTofu provider for agentplane (plugin protocols 6 and 5).
///
/// Terraform and OpenTofu start this binary themselves (go-plugin handshake, AutoMTLS). Run by
/// hand it only explains that, unless --debug is given.
///
/// Environment: TF_LOG_PROVIDER / TF_LOG set the log level (JSON on stderr);
/// PLUGIN_PROTOCOL_VERSIONS limits the protocol majors offered (e.g. "5");
/// AWS_* variables feed the default AWS credential chain.
#[derive(Parser, Debug)]
#[command(name = "terraform-provider-agentplane", version, about, long_about)]
struct Cli {
    /// Serve in debug mode (no Terraform needed to start it) and print a TF_REATTACH_PROVIDERS
    /// value to paste into the shell that runs terraform/tofu.
    #[arg(long)]
    debug: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    plugin::log::init();
    // Two worker threads are plenty for a provider and keep start-up cheap.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("terraform-provider-agentplane: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mode = if cli.debug { Mode::Debug } else { Mode::Plugin };
    match rt.block_on(plugin::serve(AgentplaneProvider, mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(ServeError::Handshake(e)) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("terraform-provider-agentplane: {e}");
            ExitCode::FAILURE
        }
    }
}
