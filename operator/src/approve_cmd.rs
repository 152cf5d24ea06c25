//! `agentplane approvals`, `agentplane approve TASK` and `agentplane deny TASK`: the approver's CLI
//! over the gateway's `/v1/approvals` and `/v1/tasks/{id}/approve|deny`, with the approver's bearer
//! credential (the gateway's `--approver NAME=TOKEN`).

use agentplane::client::GatewayClient;
use agentplane_api::wire::{ApprovalRequest, PendingApproval};
use anyhow::Context as _;

/// Where the gateway is and who is asking.
#[derive(clap::Args, Debug)]
pub struct ApproverArgs {
    /// The gateway's base URL.
    #[arg(
        long,
        env = "AGENTPLANE_GATEWAY",
        default_value = "http://127.0.0.1:8787"
    )]
    gateway: String,
    /// The approver's bearer credential.
    #[arg(long, env = "AGENTPLANE_APPROVER_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(clap::Args, Debug)]
pub struct DecideArgs {
    #[command(flatten)]
    approver: ApproverArgs,
    /// The task id.
    task: String,
    /// The plan step to decide on. The decision then carries the digest of that step's pending
    /// arguments as listed, so it covers exactly the call shown and nothing else.
    #[arg(long)]
    step: Option<u32>,
    /// A comment kept with the decision (at most 1024 bytes).
    #[arg(long)]
    comment: Option<String>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// One line per pending approval.
fn describe(p: &PendingApproval) -> String {
    let what = match (&p.step, &p.tool) {
        (Some(step), Some(tool)) => format!(
            "step {step}: {}{tool} {}",
            p.server
                .as_deref()
                .map(|s| format!("{s}/"))
                .unwrap_or_default(),
            p.arguments
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_default()
        ),
        (Some(step), None) => format!("step {step}"),
        _ => "task".to_owned(),
    };
    let prompt: String = p.prompt.chars().take(80).collect();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{what}\t{prompt:?}",
        p.task_id,
        p.device_id,
        p.user_id,
        p.intent_type,
        p.waiting_since.as_deref().unwrap_or("-")
    )
}

pub fn list(args: ApproverArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let gw = GatewayClient::new(&args.gateway);
        let list = gw
            .approvals(&args.token)
            .await
            .with_context(|| format!("listing approvals at {}", args.gateway))?;
        println!("TASK\tDEVICE\tUSER\tINTENT\tWAITING SINCE\tDECIDE ON\tPROMPT");
        for p in &list.pending {
            println!("{}", describe(p));
        }
        Ok(())
    })
}

pub fn decide(args: DecideArgs, approve: bool) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let gw = GatewayClient::new(&args.approver.gateway);
        let args_digest = match args.step {
            None => None,
            Some(step) => {
                let list = gw
                    .approvals(&args.approver.token)
                    .await
                    .with_context(|| format!("listing approvals at {}", args.approver.gateway))?;
                let pending = list
                    .pending
                    .iter()
                    .find(|p| p.task_id == args.task && p.step == Some(step))
                    .with_context(|| {
                        format!(
                            "task {} is not waiting for approval at step {step}",
                            args.task
                        )
                    })?;
                pending.args_digest.clone()
            }
        };
        let request = ApprovalRequest {
            comment: args.comment.clone(),
            step: args.step,
            args_digest,
        };
        let verb = if approve { "approving" } else { "denying" };
        let view = gw
            .decide_with(&args.approver.token, &args.task, approve, &request)
            .await
            .with_context(|| format!("{verb} task {}", args.task))?;
        let decided = view
            .approval
            .as_ref()
            .map(|a| format!("{:?} by {}", a.decision, a.approver))
            .unwrap_or_default();
        println!("task {}: {} ({decided})", view.task_id, view.phase);
        Ok(())
    })
}
