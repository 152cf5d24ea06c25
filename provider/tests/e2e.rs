//! End to end with the real clients: OpenTofu 1.10 and Terraform 1.5.7 drive the provider
//! (installed from a filesystem mirror) against moto from the shared real-peer stack, over
//! protocol 6 and protocol 5.
//!
//! Each test walks one client/protocol pair through init, plan, apply, an empty second plan,
//! an in-place update, a ForceNew replacement, import of every resource, an out-of-band
//! delete that plans as "will be created", and destroy. A missing peer fails the test with the
//! reason (`ci/peers.sh` builds them).

mod common;

use std::path::PathBuf;
use std::process::Output;

use agentplane_testsupport::{Stack, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};

struct Workspace {
    client: &'static str,
    protocol: u32,
    dir: tempfile::TempDir,
    stack: &'static Stack,
    prefix: String,
}

impl Workspace {
    fn new(client: &'static str, protocol: u32) -> Workspace {
        let stack = Stack::shared().unwrap_or_else(|e| panic!("real-peer stack unavailable: {e}"));
        agentplane_testsupport::peer_path(client).unwrap_or_else(|e| panic!("{client}: {e}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("agentplane-e2e-{client}-{protocol}."))
            .tempdir()
            .unwrap();
        // Installed the way users install it: an unpacked filesystem mirror.
        common::install_provider(dir.path());
        let prefix = format!("e2e-{client}-p{protocol}-{}", std::process::id());
        Workspace {
            client,
            protocol,
            dir,
            stack,
            prefix,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Writes main.tf from the knobs the scenario turns.
    fn config(
        &self,
        queue_name: &str,
        visibility: i64,
        description: &str,
        extra_tag: bool,
        sign_spec: &str,
    ) {
        let ep = self.stack.aws_endpoint();
        let tags = if extra_tag {
            r#"{ env = "test", tier = "gold" }"#
        } else {
            r#"{ env = "test" }"#
        };
        let p = &self.prefix;
        let tf = format!(
            r#"terraform {{
  required_providers {{
    agentplane = {{ source = "registry.terraform.io/agentplane/agentplane" }}
  }}
}}

provider "agentplane" {{
  region     = "{TEST_REGION}"
  access_key = "{TEST_ACCESS_KEY_ID}"
  secret_key = "{TEST_SECRET_ACCESS_KEY}"
  endpoints {{
    sqs = "{ep}"
    kms = "{ep}"
  }}
}}

resource "agentplane_kms_key" "k" {{
  description             = "{description}"
  alias                   = "alias/{p}"
  enable_key_rotation     = true
  tags                    = {tags}
}}

resource "agentplane_kms_key" "s" {{
  key_usage = "SIGN_VERIFY"
  key_spec  = "{sign_spec}"
}}

resource "agentplane_queue" "q" {{
  name                       = "{queue_name}"
  visibility_timeout_seconds = {visibility}
  receive_wait_time_seconds  = 20
  kms_master_key_id          = agentplane_kms_key.k.key_id
  max_receive_count          = 3
  tags                       = {tags}
}}

resource "agentplane_queue" "f" {{
  name                        = "{p}-orders.fifo"
  fifo                        = true
  content_based_deduplication = true
}}

data "agentplane_queue" "q" {{
  name = agentplane_queue.q.name
}}

output "queue_url" {{ value = agentplane_queue.q.url }}
output "dlq_arn" {{ value = agentplane_queue.q.dlq_arn }}
output "data_arn" {{ value = data.agentplane_queue.q.arn }}
output "key_id" {{ value = agentplane_kms_key.k.key_id }}
output "sign_key_id" {{ value = agentplane_kms_key.s.key_id }}
"#
        );
        std::fs::write(self.dir.path().join("main.tf"), tf).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.stack.command(self.client).unwrap();
        common::client_env(&mut cmd, self.dir.path(), self.protocol);
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", self.client))
    }

    /// Runs a command that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{} {args:?} failed ({}):\n{stdout}\n{}",
            self.client,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `plan -detailed-exitcode`: 0 = no changes, 2 = changes. Returns (code, stdout).
    fn plan(&self) -> (i32, String) {
        let out = self.run(&["plan", "-no-color", "-input=false", "-detailed-exitcode"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 2,
            "plan failed ({code}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, stdout)
    }

    fn assert_empty_plan(&self, after: &str) {
        let (code, out) = self.plan();
        assert_eq!(code, 0, "plan after {after} is not empty:\n{out}");
    }

    fn apply(&self) -> String {
        self.ok(&["apply", "-no-color", "-input=false", "-auto-approve"])
    }

    fn output(&self, name: &str) -> String {
        self.ok(&["output", "-raw", name])
    }
}

fn lifecycle(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol);
    let jobs = format!("{}-jobs", ws.prefix);
    ws.config(&jobs, 60, "v1", false, "ECC_NIST_P256");

    ws.ok(&["init", "-no-color", "-input=false"]);
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(plan.contains("4 to add"), "{plan}");

    ws.apply();
    ws.assert_empty_plan("apply");
    let url = ws.output("queue_url");
    assert!(url.ends_with(&jobs), "{url}");
    assert!(ws.output("dlq_arn").ends_with(&format!("{jobs}-dlq")));
    assert!(ws.output("data_arn").ends_with(&jobs));

    // The negotiated protocol is the one we asked for.
    let log = std::fs::read_to_string(ws.path().join("client.log")).unwrap_or_default();
    // go-plugin re-logs our hclog JSON line as `provider serving: protocol=N ...`.
    assert!(
        log.contains(&format!("protocol={protocol}")),
        "provider log does not show protocol {protocol}"
    );
    assert!(
        !log.contains(&format!("protocol={}", 11 - protocol)),
        "a provider process negotiated the other protocol"
    );

    // In-place update: visibility, description, tags.
    ws.config(&jobs, 120, "v2", true, "ECC_NIST_P256");
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("updated in-place")
            && plan.contains("0 to add")
            && plan.contains("0 to destroy"),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("in-place update");

    // ForceNew: a new name replaces the queue (and its DLQ), a new key spec the signing key.
    let jobs2 = format!("{}-jobs2", ws.prefix);
    let old_sign_key = ws.output("sign_key_id");
    ws.config(&jobs2, 120, "v2", true, "ECC_NIST_P384");
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_queue.q must be replaced"),
        "{plan}"
    );
    assert!(
        plan.contains("agentplane_kms_key.s must be replaced"),
        "{plan}"
    );
    assert!(
        plan.contains("2 to add, 0 to change, 2 to destroy"),
        "{plan}"
    );
    ws.apply();
    ws.assert_empty_plan("replacement");
    assert_ne!(
        ws.output("sign_key_id"),
        old_sign_key,
        "the signing key was not replaced"
    );

    // Import every resource back after forgetting it. The key keeps the default rotation
    // period and deletion window here: KMS never returns the deletion window, and moto does not
    // return the rotation period (a documented moto gap), so a non-default value would show as
    // a one-time diff after import against moto (not against AWS for the rotation period).
    let key_id = ws.output("key_id");
    let sign_key_id = ws.output("sign_key_id");
    for (addr, id) in [
        ("agentplane_queue.q", jobs2.clone()),
        ("agentplane_queue.f", format!("{}-orders.fifo", ws.prefix)),
        ("agentplane_kms_key.k", key_id),
        ("agentplane_kms_key.s", sign_key_id),
    ] {
        ws.ok(&["state", "rm", "-no-color", addr]);
        ws.ok(&["import", "-no-color", "-input=false", addr, &id]);
    }
    ws.assert_empty_plan("import");

    // Out-of-band delete: the next plan recreates the queue.
    let url = ws.output("queue_url");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sqs = aws_sdk_sqs::Client::new(&ws.stack.aws_sdk_config().await);
        sqs.delete_queue().queue_url(&url).send().await.unwrap();
    });
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_queue.q will be created"),
        "{plan}"
    );

    ws.apply();
    ws.assert_empty_plan("recreate");
    let out = ws.ok(&["destroy", "-no-color", "-input=false", "-auto-approve"]);
    assert!(out.contains("destroyed"), "{out}");
    rt.block_on(async {
        let sqs = aws_sdk_sqs::Client::new(&ws.stack.aws_sdk_config().await);
        let left = sqs
            .list_queues()
            .queue_name_prefix(&ws.prefix)
            .send()
            .await
            .unwrap();
        assert!(
            left.queue_urls().is_empty(),
            "queues left after destroy: {:?}",
            left.queue_urls()
        );
    });
}

fn invalid_config_is_reported_with_paths(client: &'static str) {
    let ws = Workspace::new(client, 6);
    ws.config(
        &format!("{}-bad", ws.prefix),
        60,
        "x",
        false,
        "ECC_NIST_P256",
    );
    // Both errors sit on resources with no dependency between them: the client does not
    // validate resources that depend on one that already failed.
    let tf = std::fs::read_to_string(ws.path().join("main.tf"))
        .unwrap()
        .replace(
            "enable_key_rotation     = true",
            "enable_key_rotation     = true\n  deletion_window_in_days = 3",
        )
        .replace(
            "fifo                        = true",
            "fifo                        = true\n  visibility_timeout_seconds  = 50000",
        );
    std::fs::write(ws.path().join("main.tf"), tf).unwrap();
    ws.ok(&["init", "-no-color", "-input=false"]);
    let out = ws.run(&["validate", "-no-color"]);
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("visibility_timeout_seconds must be a whole number between 0 and 43200"),
        "{text}"
    );
    assert!(
        text.contains("deletion_window_in_days must be a whole number between 7 and 30"),
        "{text}"
    );
}

#[test]
fn tofu_protocol6_lifecycle() {
    lifecycle("tofu", 6);
}

#[test]
fn tofu_protocol5_lifecycle() {
    lifecycle("tofu", 5);
}

#[test]
fn terraform_protocol6_lifecycle() {
    lifecycle("terraform", 6);
}

#[test]
fn terraform_protocol5_lifecycle() {
    lifecycle("terraform", 5);
}

#[test]
fn tofu_validation_diagnostics() {
    invalid_config_is_reported_with_paths("tofu");
}

#[test]
fn terraform_validation_diagnostics() {
    invalid_config_is_reported_with_paths("terraform");
}
