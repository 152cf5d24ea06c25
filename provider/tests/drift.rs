//! Drift and permanent-diff repairs (issue 15 items 1, 2 and 4), driven the way a user meets
//! them: the real clients (OpenTofu over protocol 6, Terraform 1.5.7 over protocol 5) against
//! moto from the shared real-peer stack, with out-of-band changes made through the AWS SDK.
//! A missing peer fails the test with the reason (`ci/peers.sh` builds them).

mod common;

use aws_sdk_sqs::types::QueueAttributeName as A;
use common::Workspace;

/// (deadLetterTargetArn, maxReceiveCount) of a queue's RedrivePolicy, `None` when it has none.
async fn redrive_of(sqs: &aws_sdk_sqs::Client, url: &str) -> Option<(String, i64)> {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::RedrivePolicy)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    let j: serde_json::Value = serde_json::from_str(attrs.get(&A::RedrivePolicy)?).unwrap();
    let n = match &j["maxReceiveCount"] {
        serde_json::Value::String(s) => s.parse().unwrap(),
        v => v.as_i64().unwrap(),
    };
    Some((j["deadLetterTargetArn"].as_str().unwrap().to_string(), n))
}

/// (URL, ARN) of the queue named `name`, panicking with the name when it does not exist.
async fn queue(sqs: &aws_sdk_sqs::Client, name: &str) -> (String, String) {
    let url = sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("queue {name} does not exist: {e:?}"))
        .queue_url
        .unwrap();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(A::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()
        .remove(&A::QueueArn)
        .unwrap();
    (url, arn)
}

/// Asserts a plan proposes exactly one in-place update of `agentplane_queue.q`.
fn assert_in_place_update(code: i32, plan: &str) {
    assert_eq!(code, 2, "{plan}");
    assert!(
        plan.contains("agentplane_queue.q will be updated in-place")
            && plan.contains("0 to add, 1 to change, 0 to destroy"),
        "expected an in-place update of the queue, not a create:\n{plan}"
    );
}

/// Item 1: the DLQ deleted, then the RedrivePolicy removed, while the main queue stays.
fn dlq_drift(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "drift");
    let jobs = format!("{}-jobs", ws.prefix);
    let dlq = format!("{jobs}-dlq");
    ws.write_config(&format!(
        r#"resource "agentplane_queue" "q" {{
  name              = "{jobs}"
  max_receive_count = 3
  tags              = {{ env = "test" }}
}}
"#
    ));
    ws.init();
    ws.apply();
    ws.assert_empty_plan("apply");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sqs = rt.block_on(ws.sqs());
    let (url, _) = rt.block_on(queue(&sqs, &jobs));

    // The DLQ is deleted out of band. Like SQS, moto keeps the main queue's RedrivePolicy
    // pointing at the deleted queue's ARN (checked here so the scenario is the real one).
    let (dlq_url, old_dlq_arn) = rt.block_on(queue(&sqs, &dlq));
    rt.block_on(sqs.delete_queue().queue_url(&dlq_url).send())
        .unwrap();
    assert_eq!(
        rt.block_on(redrive_of(&sqs, &url)),
        Some((old_dlq_arn, 3)),
        "moto no longer keeps a redrive to a deleted DLQ; revisit this scenario"
    );

    let (code, plan) = ws.plan();
    assert_in_place_update(code, &plan);
    ws.apply();
    ws.assert_empty_plan("repairing the DLQ");
    let (new_dlq_url, new_dlq_arn) = rt.block_on(queue(&sqs, &dlq));
    assert_eq!(
        rt.block_on(redrive_of(&sqs, &url)),
        Some((new_dlq_arn.clone(), 3))
    );
    let dlq_tags = rt
        .block_on(sqs.list_queue_tags().queue_url(&new_dlq_url).send())
        .unwrap()
        .tags
        .unwrap_or_default();
    assert_eq!(
        dlq_tags.get("env").map(String::as_str),
        Some("test"),
        "{dlq_tags:?}"
    );

    // The RedrivePolicy is removed out of band (an empty value clears it in SQS and moto).
    rt.block_on(
        sqs.set_queue_attributes()
            .queue_url(&url)
            .attributes(A::RedrivePolicy, "")
            .send(),
    )
    .unwrap();
    assert_eq!(
        rt.block_on(redrive_of(&sqs, &url)),
        None,
        "moto did not clear the RedrivePolicy"
    );
    let (code, plan) = ws.plan();
    assert_in_place_update(code, &plan);
    ws.apply();
    ws.assert_empty_plan("repairing the redrive");
    assert_eq!(
        rt.block_on(redrive_of(&sqs, &url)),
        Some((new_dlq_arn, 3)),
        "the redrive was not re-attached to the real DLQ"
    );

    // Destroy with the DLQ gone again removes the main queue too (it used to be orphaned).
    let (dlq_url, _) = rt.block_on(queue(&sqs, &dlq));
    rt.block_on(sqs.delete_queue().queue_url(&dlq_url).send())
        .unwrap();
    let out = ws.destroy();
    assert!(out.contains("destroyed"), "{out}");
    rt.block_on(ws.assert_no_queues_left());
}

/// Item 2: values that used to plan a diff after every apply.
fn permanent_diffs(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "diffs");
    let p = &ws.prefix;
    // `kms_master_key_id = ""` is the usual module default for "no CMK".
    let plain = format!(
        r#"resource "agentplane_queue" "q" {{
  name              = "{p}-plain"
  kms_master_key_id = ""
}}
"#
    );
    ws.write_config(&plain);
    ws.init();
    ws.apply();
    ws.assert_empty_plan("apply with kms_master_key_id = \"\"");

    // A null tag value cannot be stored (AWS has no null tag) nor planned away (the plan must
    // match the configuration), so validate refuses it and names the attribute.
    ws.write_config(&format!(
        r#"{plain}
resource "agentplane_queue" "t" {{
  name = "{p}-tagged"
  tags = {{ env = "test", owner = null }}
}}

resource "agentplane_kms_key" "k" {{
  tags = {{ team = null }}
}}
"#
    ));
    let text = ws.fails(&["validate", "-no-color"]);
    assert!(text.contains(r#"tags["owner"] is null"#), "{text}");
    assert!(text.contains(r#"tags["team"] is null"#), "{text}");

    ws.write_config(&plain);
    ws.destroy();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(ws.assert_no_queues_left());
}

/// Item 4: importing a KMS key by ARN settles `id` to the key id in the import read.
fn kms_import_by_arn(client: &'static str, protocol: u32) {
    let ws = Workspace::new(client, protocol, "import");
    ws.write_config(
        r#"resource "agentplane_kms_key" "k" {
  description = "imported by ARN"
}

output "arn" { value = agentplane_kms_key.k.arn }
output "key_id" { value = agentplane_kms_key.k.key_id }
"#,
    );
    ws.init();
    ws.apply();
    let (arn, key_id) = (ws.output("arn"), ws.output("key_id"));
    assert!(arn.starts_with("arn:") && arn.ends_with(&key_id), "{arn}");

    ws.ok(&["state", "rm", "-no-color", "agentplane_kms_key.k"]);
    ws.ok(&[
        "import",
        "-no-color",
        "-input=false",
        "agentplane_kms_key.k",
        &arn,
    ]);
    let show: serde_json::Value =
        serde_json::from_str(&ws.ok(&["show", "-json", "-no-color"])).unwrap();
    let values = &show["values"]["root_module"]["resources"][0]["values"];
    assert_eq!(values["id"], key_id.as_str(), "import read left {values}");
    assert_eq!(values["key_id"], key_id.as_str(), "{values}");

    // Nothing "changed outside" on the next refresh, and nothing to do.
    let (code, plan) = ws.plan_with(&["-refresh-only"]);
    assert!(
        code == 0 && !plan.contains("changed outside"),
        "refresh after import by ARN reports drift:\n{plan}"
    );
    ws.assert_empty_plan("import by ARN");
    ws.destroy();
}

#[test]
fn tofu_dlq_deleted_out_of_band() {
    dlq_drift("tofu", 6);
}

#[test]
fn terraform_dlq_deleted_out_of_band() {
    dlq_drift("terraform", 5);
}

#[test]
fn tofu_no_permanent_diffs() {
    permanent_diffs("tofu", 6);
}

#[test]
fn terraform_no_permanent_diffs() {
    permanent_diffs("terraform", 5);
}

#[test]
fn tofu_kms_import_by_arn() {
    kms_import_by_arn("tofu", 6);
}

#[test]
fn terraform_kms_import_by_arn() {
    kms_import_by_arn("terraform", 5);
}
