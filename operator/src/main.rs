//! `agentplane`: the cloud runtime binary.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod approve_cmd;
mod bench;
mod cloud_cmd;
mod cloud_models;
mod cluster_bench;
mod crdgen;
mod dev;

/// agentplane cloud runtime: verifies signed intents, applies policy, queues and runs agent tasks.
#[derive(Parser, Debug)]
#[command(name = "agentplane", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the CustomResourceDefinitions as YAML, one file per CRD.
    Crdgen {
        /// Directory to write into (created if missing).
        #[arg(long, default_value = "charts/agentplane/crds")]
        out: PathBuf,
        /// Print every CRD to stdout as one multi-document YAML stream instead of writing files.
        #[arg(long)]
        stdout: bool,
    },
    /// Run the controller against the Kubernetes API: admit AgentTasks and queue them on SQS
    /// (Lease-based leader election; one replica acts at a time).
    Operator(Box<cloud_cmd::OperatorArgs>),
    /// Run workers: take tasks off SQS, call the model, write the result to the AgentTask.
    Worker(Box<cloud_cmd::WorkerArgs>),
    /// Serve the device gateway API in front of the Kubernetes API.
    Gateway(Box<cloud_cmd::GatewayArgs>),
    /// Run gateway + controller + worker in one process on an embedded SQLite store (no cluster).
    Dev(Box<dev::DevArgs>),
    /// Scripted demo device: enrolls, submits signed intents, prints each task's phases and result.
    #[command(hide = true)]
    DevClient(dev::DevClientArgs),
    /// Benchmark of the embedded runtime over HTTP (ci/bench/runtime).
    #[command(hide = true)]
    DevBench(bench::BenchArgs),
    /// Benchmark of the distributed runtime against a ci/stack.sh stack (ci/bench/runtime).
    #[command(hide = true)]
    ClusterBench(cluster_bench::ClusterBenchArgs),
    /// List the tasks awaiting an approver's decision (GET /v1/approvals).
    Approvals(approve_cmd::ApproverArgs),
    /// Approve a task awaiting approval (or, with --step, that step's pending call).
    Approve(approve_cmd::DecideArgs),
    /// Deny a task awaiting approval (or, with --step, that step's pending call).
    Deny(approve_cmd::DecideArgs),
    /// Tamper-evident audit log tools: verify a log offline, print inclusion/consistency proofs.
    Audit(agentplane::audit::cli::AuditArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { out, stdout } => {
            if stdout {
                print!("{}", crdgen::render_stream()?);
            } else {
                for (path, _) in crdgen::write_all(&out)
                    .with_context(|| format!("writing CRDs into {}", out.display()))?
                {
                    println!("wrote {}", path.display());
                }
            }
        }
        Command::Dev(args) => dev::run(*args)?,
        Command::Operator(args) => cloud_cmd::run_operator(*args)?,
        Command::Worker(args) => cloud_cmd::run_worker(*args)?,
        Command::Gateway(args) => cloud_cmd::run_gateway(*args)?,
        Command::DevClient(args) => dev::run_client(args)?,
        Command::DevBench(args) => bench::run(args)?,
        Command::ClusterBench(args) => cluster_bench::run(args)?,
        Command::Approvals(args) => approve_cmd::list(args)?,
        Command::Approve(args) => approve_cmd::decide(args, true)?,
        Command::Deny(args) => approve_cmd::decide(args, false)?,
        Command::Audit(args) => std::process::exit(agentplane::audit::cli::run(args)),
    }
    Ok(())
}
