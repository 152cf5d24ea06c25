//! `agentplane audit`: offline tools over an audit log file. None of them writes to the log.
//!
//! Exit codes: 0 success, 1 the log (or a proof) failed verification, 2 the command could not run
//! (unreadable file, bad arguments).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::checkpoint::{CheckpointSigner as _, Ed25519Signer, SignedCheckpoint, TrustedKey};
use super::verify::{self, VerifyError, VerifyOptions};

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify a log offline: checkpoint signatures and consistency, every leaf against every signed
    /// root, seq contiguity. Prints the first problem with its position and exits 1 on failure.
    Verify {
        /// The audit log (SQLite file).
        #[arg(long)]
        log: PathBuf,
        /// PEM public key checkpoints must be signed with (repeatable). Without one, the keys recorded
        /// in the log are used, which only shows the log agrees with itself.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// A checkpoint saved earlier with `agentplane audit checkpoint` (repeatable): the log must still
        /// contain the tree it signed, which catches a history rewritten and re-signed with the same key.
        #[arg(long = "trusted-checkpoint")]
        trusted_checkpoints: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the inclusion proof of leaf SEQ as JSON, against the latest checkpoint (or the one of --size).
    Proof {
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        seq: u64,
        #[arg(long)]
        size: Option<u64>,
    },
    /// Print the consistency proof between the checkpoints of sizes FROM and TO (default: the latest).
    Consistency {
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Print the latest signed checkpoint as JSON; keep it elsewhere for `verify --trusted-checkpoint`.
    Checkpoint {
        #[arg(long)]
        log: PathBuf,
    },
    /// Print every leaf (one canonical JSON event per line), in seq order.
    Export {
        #[arg(long)]
        log: PathBuf,
    },
    /// Print a public key as PEM: the key of a local Ed25519 key file, or the keys a log records.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["key_file", "log"])))]
    PublicKey {
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Signer(#[from] super::checkpoint::SignerError),
}

/// Runs a subcommand; returns the process exit code.
pub fn run(args: AuditArgs) -> i32 {
    let code = match execute(args.command) {
        Ok(code) => code,
        Err(CliError::Verify(VerifyError::Invalid(problem))) => {
            println!("FAILED: {problem}");
            1
        }
        Err(CliError::Verify(VerifyError::Proof(reason))) => {
            println!("FAILED: {reason}");
            1
        }
        Err(e) => {
            eprintln!("agentplane audit: {e}");
            2
        }
    };
    let _ = std::io::stdout().flush();
    code
}

fn read_file(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| CliError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn execute(command: AuditCommand) -> Result<i32, CliError> {
    match command {
        AuditCommand::Verify {
            log,
            public_keys,
            trusted_checkpoints,
            json,
        } => {
            let mut opts = VerifyOptions::default();
            for path in &public_keys {
                let key = TrustedKey::from_pem(&read_file(path)?).map_err(|e| CliError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                opts.trusted_keys.push(key);
            }
            for path in &trusted_checkpoints {
                let cp: SignedCheckpoint =
                    serde_json::from_str(&read_file(path)?).map_err(|e| CliError::File {
                        path: path.clone(),
                        reason: format!("not a signed checkpoint: {e}"),
                    })?;
                opts.trusted_checkpoints.push(cp);
            }
            let report = verify::verify_log(&log, &opts)?;
            if json {
                print_json(&report)?;
            } else {
                let mut out = std::io::stdout().lock();
                let latest = report.latest_checkpoint.as_ref().map_or_else(
                    || "none".to_owned(),
                    |c| {
                        format!(
                            "{} (size {}, root {})",
                            c.index,
                            c.size,
                            hex::encode(c.root)
                        )
                    },
                );
                writeln!(
                    out,
                    "OK: {} leaves, {} checkpoints, latest checkpoint {latest}; {} leaves not yet covered by a checkpoint",
                    report.leaves, report.checkpoints, report.uncovered_leaves
                )?;
                writeln!(out, "origin: {}", report.origin)?;
                if report.keys_from_log {
                    writeln!(
                        out,
                        "warning: signatures were checked against the keys recorded in the log itself; pass --public-key to pin the signer"
                    )?;
                }
            }
            Ok(0)
        }
        AuditCommand::Proof { log, seq, size } => {
            print_json(&verify::inclusion_proof_from_file(&log, seq, size)?)?;
            Ok(0)
        }
        AuditCommand::Consistency { log, from, to } => {
            print_json(&verify::consistency_proof_from_file(&log, from, to)?)?;
            Ok(0)
        }
        AuditCommand::Checkpoint { log } => {
            let conn = verify::open_read_only(&log)?;
            match verify::read_checkpoints(&conn)?.pop() {
                Some(cp) => {
                    print_json(&cp)?;
                    Ok(0)
                }
                None => Err(CliError::File {
                    path: log,
                    reason: "the log has no checkpoint yet".into(),
                }),
            }
        }
        AuditCommand::Export { log } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            verify::for_each_leaf(&log, |_, data| {
                out.write_all(data)?;
                out.write_all(b"\n")
            })?;
            out.flush()?;
            Ok(0)
        }
        AuditCommand::PublicKey { key_file, log } => {
            let keys = match (key_file, log) {
                (Some(path), _) => vec![Ed25519Signer::load_existing(&path)?.public_key().clone()],
                (None, Some(log)) => verify::keys_in_log(&log)?,
                (None, None) => Vec::new(),
            };
            let mut out = std::io::stdout().lock();
            for k in keys {
                write!(out, "{}", k.to_pem())?;
            }
            Ok(0)
        }
    }
}
