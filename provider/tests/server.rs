//! The protocol-6 service in process (no network): provider configuration that is unknown at
//! plan time, planning (defaults, prior state for unset computed values, ForceNew ->
//! requires_replace, destroy), state upgrade from JSON and import.

use std::collections::BTreeMap;

use terraform_provider_agentplane::AgentplaneProvider;
use terraform_provider_agentplane::framework::codec::{decode_msgpack, encode_msgpack};
use terraform_provider_agentplane::framework::server::Server;
use terraform_provider_agentplane::framework::{Provider, Resource, Type, Value};
use terraform_provider_agentplane::resources::queue::Queue;
use tfplugin_protocol::tfplugin6 as pb;
use tfplugin_protocol::tfplugin6::provider_server::Provider as _;
use tonic::Request;

fn dv(v: &Value, ty: &Type) -> Option<pb::DynamicValue> {
    Some(pb::DynamicValue {
        msgpack: encode_msgpack(v, ty),
        json: vec![],
    })
}

fn obj(pairs: &[(&str, Value)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn queue_ty() -> Type {
    Queue.schema().block.ty()
}

#[tokio::test]
async fn unknown_provider_config_is_a_clear_error() {
    let s = Server::new(AgentplaneProvider);
    let ty = AgentplaneProvider.schema().block.ty();
    let r = s
        .configure_provider(Request::new(pb::configure_provider::Request {
            config: dv(&obj(&[("region", Value::UNKNOWN)]), &ty),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.diagnostics.len(), 1);
    assert_eq!(
        r.diagnostics[0].summary,
        "Provider configuration is not known yet"
    );

    let ok = s
        .configure_provider(Request::new(pb::configure_provider::Request {
            config: dv(&obj(&[("region", Value::string("us-east-1"))]), &ty),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.diagnostics.is_empty(), "{:?}", ok.diagnostics);
}

async fn plan(
    s: &Server<AgentplaneProvider>,
    prior: &Value,
    config: &Value,
    proposed: &Value,
) -> (Value, Vec<pb::AttributePath>) {
    let ty = queue_ty();
    let r = s
        .plan_resource_change(Request::new(pb::plan_resource_change::Request {
            type_name: "agentplane_queue".into(),
            prior_state: dv(prior, &ty),
            proposed_new_state: dv(proposed, &ty),
            config: dv(config, &ty),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.diagnostics.is_empty(), "{:?}", r.diagnostics);
    (
        decode_msgpack(&r.planned_state.unwrap().msgpack, &ty).unwrap(),
        r.requires_replace,
    )
}

#[tokio::test]
async fn plans_create_update_replace_and_destroy() {
    let s = Server::new(AgentplaneProvider);
    let cfg = obj(&[
        ("name", Value::string("jobs")),
        ("visibility_timeout_seconds", Value::int(60)),
    ]);

    // Create: defaults planned, outputs unknown, the DLQ name known.
    let (planned, rr) = plan(&s, &Value::Null, &cfg, &cfg).await;
    assert!(rr.is_empty());
    assert_eq!(
        planned.get("message_retention_seconds"),
        &Value::int(345_600)
    );
    assert_eq!(planned.get("visibility_timeout_seconds"), &Value::int(60));
    assert_eq!(planned.get("url"), &Value::UNKNOWN);
    assert_eq!(planned.get("dlq_name"), &Value::string("jobs-dlq"));

    // Prior state as apply would leave it.
    let mut prior = planned.clone();
    for (k, v) in [
        ("id", "u"),
        ("url", "u"),
        ("arn", "a"),
        ("dlq_url", "du"),
        ("dlq_arn", "da"),
    ] {
        prior.set(k, Value::string(v));
    }

    // Unchanged config: the plan is the prior state (Terraform's proposal keeps computed values).
    let (same, rr) = plan(&s, &prior, &cfg, &prior).await;
    assert_eq!(same, prior);
    assert!(rr.is_empty());

    // In-place update.
    let cfg2 = obj(&[
        ("name", Value::string("jobs")),
        ("visibility_timeout_seconds", Value::int(120)),
    ]);
    let mut proposed = prior.clone();
    proposed.set("visibility_timeout_seconds", Value::int(120));
    let (upd, rr) = plan(&s, &prior, &cfg2, &proposed).await;
    assert!(rr.is_empty());
    assert_eq!(upd.get("url"), &Value::string("u"));

    // ForceNew.
    let cfg3 = obj(&[
        ("name", Value::string("jobs2")),
        ("visibility_timeout_seconds", Value::int(60)),
    ]);
    let mut proposed = prior.clone();
    proposed.set("name", Value::string("jobs2"));
    let (_, rr) = plan(&s, &prior, &cfg3, &proposed).await;
    use pb::attribute_path::step::Selector;
    assert_eq!(rr.len(), 1);
    assert_eq!(
        rr[0].steps[0].selector,
        Some(Selector::AttributeName("name".into()))
    );

    // Destroy (plan_destroy capability): planned null.
    let (gone, _) = plan(&s, &prior, &Value::Null, &Value::Null).await;
    assert_eq!(gone, Value::Null);
}

#[tokio::test]
async fn upgrade_state_from_json_and_import() {
    let s = Server::new(AgentplaneProvider);
    let r = s
        .upgrade_resource_state(Request::new(pb::upgrade_resource_state::Request {
            type_name: "agentplane_queue".into(),
            version: 0,
            raw_state: Some(pb::RawState {
                json: br#"{"name":"jobs","visibility_timeout_seconds":30,"fifo":false}"#.to_vec(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.diagnostics.is_empty(), "{:?}", r.diagnostics);
    let v = decode_msgpack(&r.upgraded_state.unwrap().msgpack, &queue_ty()).unwrap();
    assert_eq!(v.get("visibility_timeout_seconds"), &Value::int(30));

    let newer = s
        .upgrade_resource_state(Request::new(pb::upgrade_resource_state::Request {
            type_name: "agentplane_queue".into(),
            version: 7,
            raw_state: Some(pb::RawState {
                json: b"{}".to_vec(),
                ..Default::default()
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(newer.diagnostics[0].summary, "State from a newer provider");

    let imp = s
        .import_resource_state(Request::new(pb::import_resource_state::Request {
            type_name: "agentplane_queue".into(),
            id: "jobs".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imp.imported_resources.len(), 1);

    let unknown_type = s
        .import_resource_state(Request::new(pb::import_resource_state::Request {
            type_name: "agentplane_nope".into(),
            id: "x".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unknown_type.diagnostics[0].summary, "Unknown resource type");
}

#[tokio::test]
async fn apply_with_garbage_planned_state_is_a_diagnostic() {
    let s = Server::new(AgentplaneProvider);
    let r = s
        .apply_resource_change(Request::new(pb::apply_resource_change::Request {
            type_name: "agentplane_queue".into(),
            planned_state: Some(pb::DynamicValue {
                msgpack: vec![0x85, 0xa4, b'n'],
                json: vec![],
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.diagnostics.len(), 1);
    assert!(
        r.diagnostics[0]
            .summary
            .starts_with("Invalid planned state"),
        "{:?}",
        r.diagnostics
    );
}
