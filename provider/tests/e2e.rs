//! End to end with the real clients: OpenTofu 1.10 and Terraform 1.5.7 drive the provider
//! (installed from a filesystem mirror) against moto from the shared real-peer stack, over
//! protocol 6 and protocol 5.
//!
//! Each test walks one client/protocol pair through init, plan, apply, an empty second plan,
//! an in-place update, a ForceNew replacement, import of every resource, an out-of-band
//! delete that plans as "will be created", and destroy. A missing peer fails the test with the
//! reason (`ci/peers.sh` builds them).

mod common;

use common::Workspace;

/// Writes main.tf from the knobs the lifecycle scenario turns.
fn config(
    ws: &Workspace,
    queue_name: &str,
    visibility: i64,
    description: &str,
    extra_tag: bool,
    sign_spec: &str,
) {
    let tags = if extra_tag {
        r#"{ env = "test", tier = "gold" }"#
    } else {
        r#"{ env = "test" }"#
    };
    let p = &ws.prefix;
    ws.write_config(&format!(
        r#"resource "agentplane_kms_key" "k" {{
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
    ));
}

fn lifecycle(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "e2e");
    let jobs = format!("{}-jobs", ws.prefix);
    config(&ws, &jobs, 60, "v1", false, "ECC_NIST_P256");

    ws.init();
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
    config(&ws, &jobs, 120, "v2", true, "ECC_NIST_P256");
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
    config(&ws, &jobs2, 120, "v2", true, "ECC_NIST_P384");
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
        ws.sqs()
            .await
            .delete_queue()
            .queue_url(&url)
            .send()
            .await
            .unwrap();
    });
    let (code, plan) = ws.plan();
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_queue.q will be created"),
        "{plan}"
    );

    ws.apply();
    ws.assert_empty_plan("recreate");
    let out = ws.destroy();
    assert!(out.contains("destroyed"), "{out}");
    rt.block_on(ws.assert_no_queues_left());
}

fn invalid_config_is_reported_with_paths(client: &'static str) {
    let ws = Workspace::new(client, 6, "e2e");
    config(
        &ws,
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
    ws.init();
    let text = ws.fails(&["validate", "-no-color"]);
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
