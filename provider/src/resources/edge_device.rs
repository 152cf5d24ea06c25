//! `agentplane_edge_device`: an `EdgeDevice` (a device allowed to submit signed intents, with
//! its Ed25519 public keys), written by server-side apply. Setting `revoked = true` revokes the
//! device in place; the gateway and operator then refuse its envelopes.
//!
//! The spec is built as `agentplane_api::EdgeDeviceSpec` and keys are checked with the same
//! parser the runtime verifies signatures with, so a key Terraform accepts is one the runtime
//! can use.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use agentplane_api::envelope::parse_public_key;
use agentplane_api::{EdgeDeviceSpec, KeyAlgorithm, PublicKey};
use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value as Json, json};

use super::agent_policy::{list_block, string_list};
use super::label;
use crate::config::ProviderData;
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Validator, Value,
};
use crate::kube::{self as k, Kube, ObjRef};

pub const TYPE: &str = "agentplane_edge_device";
pub const API_VERSION: &str = "agentplane.dev/v1alpha1";

pub struct EdgeDevice;

fn schema_block() -> Block {
    let key = Block::new("A registered Ed25519 public key. Rotation: add the new key, let the old one expire (`not_after`), then remove it.")
        .attr(Attribute::string("id").required().validate(Validator::LenRange(1, 128)).describe("Key id, unique within the device (the envelope's `keyid`)."))
        .attr(Attribute::string("key").required().validate(Validator::LenRange(44, 44)).describe("Standard base64 of the raw 32-byte Ed25519 public key."))
        .attr(Attribute::string("not_after").optional().describe("RFC 3339 time after which signatures by this key are refused."));
    let mut keys = list_block(
        "public_key",
        key,
        agentplane_api::device::MAX_DEVICE_KEYS as i64,
    );
    keys.min_items = 1;
    Block::new("An EdgeDevice: a device allowed to submit signed intents to the gateway, its public keys, and whether it is revoked.")
        .attr(Attribute::string("id").computed().describe("`<namespace>/<name>`."))
        .attr(Attribute::string("namespace").required().force_new().validate(Validator::LenRange(1, 63)).describe("Namespace of the runtime. Changing it replaces the device."))
        .attr(Attribute::string("name").required().force_new().validate(Validator::LenRange(1, 253)).describe("Device name (the envelope's `deviceId`). Changing it replaces the device."))
        .attr(Attribute::string("owner").required().validate(Validator::LenRange(1, 253)).describe("The user the device belongs to."))
        .attr(string_list("allowed_intents").optional().describe("Intent types this device may submit; unset means whatever the policy allows."))
        .attr(Attribute::bool("revoked").default(Value::Bool(false)).describe("Revoke the device in place: its envelopes are refused, including ones not admitted yet."))
        .attr(Attribute::bool("force").default(Value::Bool(false)).describe("Take over fields another field manager (e.g. the gateway) owns instead of failing with a conflict."))
        .block(keys)
}

/// Parses an RFC 3339 timestamp.
fn parse_time(s: &str) -> Result<Timestamp, String> {
    Timestamp::from_str(s).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

/// The planned/state value as the API spec.
pub fn spec_from_value(v: &Value) -> Result<EdgeDeviceSpec, String> {
    let public_keys = k::items(v.get("public_key"))
        .iter()
        .map(|p| {
            Ok(PublicKey {
                id: p.get("id").as_str().unwrap_or_default().to_string(),
                alg: KeyAlgorithm::Ed25519,
                key: p.get("key").as_str().unwrap_or_default().trim().to_string(),
                not_after: match k::opt_str(p.get("not_after")) {
                    Some(t) => Some(Time(parse_time(&t)?)),
                    None => None,
                },
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(EdgeDeviceSpec {
        public_keys,
        owner: v.get("owner").as_str().unwrap_or_default().to_string(),
        allowed_intents: k::strings(v.get("allowed_intents")),
        revoked: v.get("revoked").as_bool().unwrap_or(false),
    })
}

/// Writes the spec into a state object. A `not_after` the API normalised (e.g. `+02:00` to
/// `Z`) keeps the prior spelling when it is the same instant, so it plans no diff.
pub fn spec_to_value(spec: &EdgeDeviceSpec, s: &mut Value, prior: &Value) {
    s.set("owner", Value::string(spec.owner.as_str()));
    s.set(
        "allowed_intents",
        k::string_list(&spec.allowed_intents, prior.get("allowed_intents")),
    );
    s.set("revoked", Value::Bool(spec.revoked));
    let prior_keys = k::items(prior.get("public_key"));
    let keys = spec
        .public_keys
        .iter()
        .map(|pk| {
            let prior_na = prior_keys
                .iter()
                .find(|p| p.get("id").as_str() == Some(pk.id.as_str()))
                .and_then(|p| k::opt_str(p.get("not_after")));
            let not_after = pk.not_after.as_ref().map(|t| match &prior_na {
                Some(p) if parse_time(p).ok() == Some(t.0) => p.clone(),
                _ => t.0.to_string(),
            });
            Value::Object(BTreeMap::from([
                ("id".into(), Value::string(pk.id.as_str())),
                ("key".into(), Value::string(pk.key.as_str())),
                ("not_after".into(), Value::opt_string(not_after)),
            ]))
        })
        .collect();
    s.set("public_key", Value::List(keys));
}

/// The EdgeDevice object applied for a planned value.
pub fn manifest(v: &Value) -> Result<Json, String> {
    let spec = spec_from_value(v)?;
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "EdgeDevice",
        "metadata": {
            "name": v.get("name").as_str(),
            "namespace": v.get("namespace").as_str(),
            "labels": { "app.kubernetes.io/managed-by": k::FIELD_MANAGER },
        },
        "spec": serde_json::to_value(&spec).map_err(|e| e.to_string())?,
    }))
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("name").as_str())
}

fn obj_ref(v: &Value) -> ObjRef {
    ObjRef::new(
        API_VERSION,
        "EdgeDevice",
        v.get("namespace").as_str(),
        v.get("name").as_str().unwrap_or_default(),
    )
}

fn id(v: &Value) -> Value {
    match (v.get("namespace").as_str(), v.get("name").as_str()) {
        (Some(ns), Some(n)) => Value::string(format!("{ns}/{n}")),
        _ => Value::UNKNOWN,
    }
}

async fn apply(data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
    let w = what(planned);
    let m =
        manifest(planned).map_err(|e| Diagnostics::single(format!("Invalid device for {w}"), e))?;
    let kube = Kube::connect(&data.kube, &w).await?;
    kube.apply(&w, &m, k::force(planned)).await?;
    let mut s = planned.clone();
    s.set("id", id(planned));
    Ok(s)
}

#[async_trait]
impl Resource<ProviderData> for EdgeDevice {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: schema_block(),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        if let Some(ns) = config.get("namespace").as_str()
            && !k::is_dns_label(ns)
        {
            diags.attr_error(
                AttrPath::attr("namespace"),
                "Invalid namespace",
                format!("{ns:?} is not a valid namespace name (lowercase letters, digits, '-')."),
            );
        }
        if let Some(n) = config.get("name").as_str()
            && !k::is_dns_subdomain(n)
        {
            diags.attr_error(
                AttrPath::attr("name"),
                "Invalid name",
                format!("{n:?} is not a valid object name (lowercase RFC 1123 subdomain)."),
            );
        }
        let mut ids = BTreeSet::new();
        for (i, pk) in k::items(config.get("public_key")).iter().enumerate() {
            let p = AttrPath::attr("public_key").index(i as i64);
            let key_id = pk.get("id").as_str().unwrap_or("?");
            if let Some(id) = pk.get("id").as_str()
                && !ids.insert(id.to_string())
            {
                diags.attr_error(
                    p.join("id"),
                    "Duplicate key id",
                    format!("Key id {id:?} is used twice; key ids must be unique per device."),
                );
            }
            if let Some(key) = pk.get("key").as_str()
                && let Err(e) = parse_public_key(key_id, key)
            {
                diags.attr_error(p.join("key"), "Invalid public key", e.to_string());
            }
            if let Some(t) = pk.get("not_after").as_str()
                && let Err(e) = parse_time(t)
            {
                diags.attr_error(p.join("not_after"), "Invalid time", e);
            }
        }
        if k::strings(config.get("allowed_intents")).len() > 64 {
            diags.attr_error(
                AttrPath::attr("allowed_intents"),
                "Too many intent types",
                "At most 64 allowed intent types.",
            );
        }
    }

    fn modify_plan(
        &self,
        _prior: &Value,
        planned: &mut Value,
        _config: &Value,
        _diags: &mut Diagnostics,
    ) {
        let i = id(planned);
        planned.set("id", i);
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        apply(data, planned).await
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let w = what(state);
        let kube = Kube::connect(&data.kube, &w).await?;
        let Some(live) = kube.get(&w, &obj_ref(state)).await? else {
            return Ok(None);
        };
        let spec: EdgeDeviceSpec = serde_json::from_value(live["spec"].clone()).map_err(|e| {
            Diagnostics::single(
                format!("Unreadable EdgeDevice for {w}"),
                format!("{}: {e}", obj_ref(state)),
            )
        })?;
        let mut s = match state {
            Value::Object(_) => state.clone(),
            _ => Value::Object(BTreeMap::new()),
        };
        spec_to_value(&spec, &mut s, state);
        s.set("id", id(state));
        if s.get("force").is_null() {
            s.set("force", Value::Bool(false));
        }
        Ok(Some(s))
    }

    async fn update(
        &self,
        data: &ProviderData,
        _prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        apply(data, planned).await
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let w = what(state);
        let kube = Kube::connect(&data.kube, &w).await?;
        kube.delete(&w, &obj_ref(state)).await
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        let (ns, name) = k::split_import_id(TYPE, id)?;
        Ok(Value::Object(BTreeMap::from([
            ("namespace".into(), Value::string(ns)),
            ("name".into(), Value::string(name)),
        ])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn obj(pairs: Vec<(&str, Value)>) -> Value {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn key(id: &str, key: &str, not_after: Value) -> Value {
        obj(vec![
            ("id", Value::string(id)),
            ("key", Value::string(key)),
            ("not_after", not_after),
        ])
    }

    fn device(keys: Vec<Value>) -> Value {
        obj(vec![
            ("namespace", Value::string("team-a")),
            ("name", Value::string("laptop-1")),
            ("owner", Value::string("alice")),
            ("allowed_intents", Value::Null),
            ("revoked", Value::Bool(false)),
            ("force", Value::Bool(false)),
            ("public_key", Value::List(keys)),
        ])
    }

    #[test]
    fn bad_keys_are_attribute_errors() {
        let v = device(vec![
            key("k1", KEY, Value::string("2030-01-01T00:00:00Z")),
            key("k1", &"A".repeat(44), Value::string("tomorrow")),
        ]);
        let mut d = Diagnostics::new();
        EdgeDevice.validate(&v, &mut d);
        let paths: Vec<String> =
            d.0.iter()
                .map(|d| d.path.as_ref().unwrap().to_string())
                .collect();
        assert_eq!(
            paths,
            vec![
                "public_key[1].id",
                "public_key[1].key",
                "public_key[1].not_after"
            ]
        );
    }

    #[test]
    fn not_after_keeps_the_prior_spelling_of_the_same_instant() {
        let v = device(vec![key(
            "k1",
            KEY,
            Value::string("2030-01-01T02:00:00+02:00"),
        )]);
        let spec = spec_from_value(&v).unwrap();
        let m = manifest(&v).unwrap();
        assert_eq!(
            m["spec"]["publicKeys"][0]["notAfter"],
            "2030-01-01T00:00:00Z"
        );
        let mut back = v.clone();
        spec_to_value(&spec, &mut back, &v);
        assert_eq!(back, v);
        // A different instant reads back in the API's form.
        let mut moved = spec.clone();
        moved.public_keys[0].not_after = Some(Time(parse_time("2031-01-01T00:00:00Z").unwrap()));
        spec_to_value(&moved, &mut back, &v);
        assert_eq!(
            k::items(back.get("public_key"))[0].get("not_after"),
            &Value::string("2031-01-01T00:00:00Z")
        );
    }
}
