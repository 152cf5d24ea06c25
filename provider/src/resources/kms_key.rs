//! `agentplane_kms_key`: a KMS key (encryption or signing) with optional alias and rotation.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_kms::Client;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType, Tag};

use super::{label, tag_diff, tags_value, validate_tags};
use crate::aws;
use crate::config::ProviderData;
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Validator, Value,
};

pub const TYPE: &str = "agentplane_kms_key";

pub struct KmsKey;

pub const USAGES: &[&str] = &["ENCRYPT_DECRYPT", "SIGN_VERIFY"];
/// Key specs valid for the two usages we offer (HMAC keys need GENERATE_VERIFY_MAC).
pub const SPECS: &[&str] = &[
    "SYMMETRIC_DEFAULT",
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SM2",
];
pub const DELETION_WINDOW: (i64, i64) = (7, 30);
pub const ROTATION_PERIOD: (i64, i64) = (90, 2560);

fn schema_block() -> Block {
    Block::new("A KMS key for agentplane: envelope encryption of third-party secrets (`ENCRYPT_DECRYPT`) or signing (`SIGN_VERIFY`).")
        .attr(Attribute::string("id").computed().describe("The key id."))
        .attr(Attribute::string("description").default(Value::string("")).describe("Key description."))
        .attr(
            Attribute::string("key_usage")
                .default(Value::string("ENCRYPT_DECRYPT"))
                .force_new()
                .validate(Validator::OneOf(USAGES))
                .describe("`ENCRYPT_DECRYPT` (default) or `SIGN_VERIFY`. Changing it replaces the key."),
        )
        .attr(
            Attribute::string("key_spec")
                .default(Value::string("SYMMETRIC_DEFAULT"))
                .force_new()
                .validate(Validator::OneOf(SPECS))
                .describe("Key spec, default `SYMMETRIC_DEFAULT`. Changing it replaces the key."),
        )
        .attr(Attribute::bool("enable_key_rotation").default(Value::Bool(false)).describe("Rotate the key material automatically (symmetric encryption keys only)."))
        .attr(
            Attribute::number("rotation_period_in_days")
                .default(Value::int(365))
                .validate(Validator::IntRange(ROTATION_PERIOD.0, ROTATION_PERIOD.1))
                .describe("Days between automatic rotations, 90-2560."),
        )
        .attr(
            Attribute::number("deletion_window_in_days")
                .default(Value::int(30))
                .validate(Validator::IntRange(DELETION_WINDOW.0, DELETION_WINDOW.1))
                .describe("Waiting period before a destroyed key is deleted, 7-30 days."),
        )
        .attr(Attribute::string("alias").optional().describe("Alias such as `alias/agentplane`. Must start with `alias/` and not `alias/aws/`."))
        .attr(Attribute::string_map("tags").optional().describe("Tags."))
        .attr(Attribute::string("key_id").computed().describe("Key id."))
        .attr(Attribute::string("arn").computed().describe("Key ARN."))
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("alias").as_str().or(v.get("key_id").as_str()))
}

fn is_missing<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("NotFoundException")
}

fn kms_tags(m: &BTreeMap<String, String>) -> Result<Vec<Tag>, Diagnostics> {
    m.iter()
        .map(|(k, v)| {
            Tag::builder()
                .tag_key(k)
                .tag_value(v)
                .build()
                .map_err(|e| Diagnostics::single("Invalid tag", e.to_string()))
        })
        .collect()
}

async fn set_rotation(c: &Client, id: &str, planned: &Value, w: &str) -> Result<(), Diagnostics> {
    if planned.get("enable_key_rotation").as_bool() == Some(true) {
        let days = planned
            .get("rotation_period_in_days")
            .as_i64()
            .unwrap_or(365) as i32;
        c.enable_key_rotation()
            .key_id(id)
            .rotation_period_in_days(days)
            .send()
            .await
            .map_err(|e| aws::diag(&e, w, "kms:EnableKeyRotation"))?;
    } else {
        c.disable_key_rotation()
            .key_id(id)
            .send()
            .await
            .map_err(|e| aws::diag(&e, w, "kms:DisableKeyRotation"))?;
    }
    Ok(())
}

#[async_trait]
impl Resource<ProviderData> for KmsKey {
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
        let usage =
            config
                .get("key_usage")
                .as_str()
                .unwrap_or(if config.get("key_usage").is_null() {
                    "ENCRYPT_DECRYPT"
                } else {
                    ""
                });
        let spec = config
            .get("key_spec")
            .as_str()
            .unwrap_or(if config.get("key_spec").is_null() {
                "SYMMETRIC_DEFAULT"
            } else {
                ""
            });
        if usage == "SIGN_VERIFY" && spec == "SYMMETRIC_DEFAULT" {
            diags.attr_error(
                AttrPath::attr("key_spec"),
                "Invalid key spec for signing",
                "SIGN_VERIFY keys need an asymmetric key_spec (RSA_*, ECC_* or SM2).",
            );
        }
        if usage == "ENCRYPT_DECRYPT" && spec.starts_with("ECC_") {
            diags.attr_error(
                AttrPath::attr("key_spec"),
                "Invalid key spec for encryption",
                format!(
                    "{spec} keys can only sign; use SYMMETRIC_DEFAULT or RSA_* for ENCRYPT_DECRYPT."
                ),
            );
        }
        if config.get("enable_key_rotation").as_bool() == Some(true)
            && !spec.is_empty()
            && spec != "SYMMETRIC_DEFAULT"
        {
            diags.attr_error(
                AttrPath::attr("enable_key_rotation"),
                "Rotation not supported",
                "Automatic rotation is only available for SYMMETRIC_DEFAULT keys.",
            );
        }
        validate_tags(config, diags);
        if let Some(a) = config.get("alias").as_str() {
            let name = a.strip_prefix("alias/").unwrap_or("");
            if name.is_empty()
                || a.starts_with("alias/aws/")
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
            {
                diags.attr_error(
                    AttrPath::attr("alias"),
                    "Invalid alias",
                    format!("{a:?}: aliases look like \"alias/<name>\" (letters, digits, '/', '_', '-') and may not start with \"alias/aws/\"."),
                );
            }
        }
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        let c = data.kms().await;
        let w = what(planned);
        let tags = kms_tags(&planned.get("tags").as_string_map())?;
        let mut req = c
            .create_key()
            .description(planned.get("description").as_str().unwrap_or(""))
            .key_usage(KeyUsageType::from(
                planned
                    .get("key_usage")
                    .as_str()
                    .unwrap_or("ENCRYPT_DECRYPT"),
            ))
            .key_spec(KeySpec::from(
                planned
                    .get("key_spec")
                    .as_str()
                    .unwrap_or("SYMMETRIC_DEFAULT"),
            ));
        if !tags.is_empty() {
            req = req.set_tags(Some(tags));
        }
        let meta = req
            .send()
            .await
            .map_err(|e| aws::diag(&e, &w, "kms:CreateKey"))?
            .key_metadata
            .ok_or_else(|| {
                Diagnostics::single(
                    format!("kms:CreateKey returned no key for {w}"),
                    "The KMS endpoint answered without key metadata.",
                )
            })?;
        let id = meta.key_id().to_string();
        let arn = meta.arn().unwrap_or_default().to_string();
        tracing::info!(key_id = %id, "created KMS key");

        let finish = async {
            if planned.get("enable_key_rotation").as_bool() == Some(true) {
                set_rotation(c, &id, planned, &w).await?;
            }
            if let Some(alias) = planned.get("alias").as_str() {
                c.create_alias()
                    .alias_name(alias)
                    .target_key_id(&id)
                    .send()
                    .await
                    .map_err(|e| aws::diag(&e, &w, "kms:CreateAlias"))?;
            }
            Ok::<_, Diagnostics>(())
        };
        if let Err(d) = finish.await {
            // The key exists but is half configured; schedule it for deletion instead of
            // leaking an untracked key.
            let _ = c
                .schedule_key_deletion()
                .key_id(&id)
                .pending_window_in_days(7)
                .send()
                .await;
            return Err(d);
        }
        let mut state = planned.clone();
        state.set("id", Value::String(id.clone()));
        state.set("key_id", Value::String(id));
        state.set("arn", Value::String(arn));
        Ok(state)
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let c = data.kms().await;
        let w = what(state);
        // After an import this is whatever the user gave: a key id or a key ARN.
        let Some(given) = state
            .get("key_id")
            .as_str()
            .or(state.get("id").as_str())
            .map(str::to_string)
        else {
            return Ok(None);
        };
        let meta = match c.describe_key().key_id(&given).send().await {
            Ok(o) => o.key_metadata,
            Err(e) if is_missing(&e) => None,
            Err(e) => return Err(aws::diag(&e, &w, "kms:DescribeKey")),
        };
        let Some(meta) = meta else { return Ok(None) };
        // `id` settles to the key id in this read, so an import by ARN is not followed by a
        // "changed outside" note on the next refresh.
        let id = meta.key_id().to_string();
        // A key scheduled for deletion is gone as far as configuration is concerned.
        if matches!(
            meta.key_state(),
            Some(KeyState::PendingDeletion | KeyState::PendingReplicaDeletion)
        ) {
            tracing::info!(key_id = %id, "key is pending deletion; treating it as deleted");
            return Ok(None);
        }
        let mut s = match state {
            Value::Object(_) => state.clone(),
            _ => Value::Object(BTreeMap::new()),
        };
        s.set("id", Value::string(&id));
        s.set("key_id", Value::string(&id));
        s.set("arn", Value::opt_string(meta.arn()));
        s.set(
            "description",
            Value::string(meta.description().unwrap_or("")),
        );
        if let Some(u) = meta.key_usage() {
            s.set("key_usage", Value::string(u.as_str()));
        }
        if let Some(k) = meta.key_spec() {
            s.set("key_spec", Value::string(k.as_str()));
        }
        let symmetric = meta
            .key_spec()
            .is_none_or(|k| *k == KeySpec::SymmetricDefault);
        if symmetric {
            let rot = c
                .get_key_rotation_status()
                .key_id(&id)
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "kms:GetKeyRotationStatus"))?;
            s.set("enable_key_rotation", Value::Bool(rot.key_rotation_enabled));
            if rot.key_rotation_enabled
                && let Some(days) = rot.rotation_period_in_days
            {
                s.set("rotation_period_in_days", Value::int(i64::from(days)));
            }
        } else {
            s.set("enable_key_rotation", Value::Bool(false));
        }
        // Not readable from KMS: keep what state had, or the default after an import.
        for (attr, default) in [
            ("rotation_period_in_days", 365),
            ("deletion_window_in_days", 30),
        ] {
            if s.get(attr).is_null() {
                s.set(attr, Value::int(default));
            }
        }
        let aliases = c
            .list_aliases()
            .key_id(&id)
            .send()
            .await
            .map_err(|e| aws::diag(&e, &w, "kms:ListAliases"))?;
        let names: Vec<String> = aliases
            .aliases()
            .iter()
            .filter_map(|a| a.alias_name().map(str::to_string))
            .collect();
        let current = state.get("alias").as_str().map(str::to_string);
        let alias = match current {
            Some(a) if names.contains(&a) => Some(a),
            _ => names.into_iter().next(),
        };
        s.set("alias", Value::opt_string(alias));
        let tags = c
            .list_resource_tags()
            .key_id(&id)
            .send()
            .await
            .map_err(|e| aws::diag(&e, &w, "kms:ListResourceTags"))?;
        let tags: BTreeMap<String, String> = tags
            .tags()
            .iter()
            .map(|t| (t.tag_key().to_string(), t.tag_value().to_string()))
            .collect();
        s.set("tags", tags_value(tags, state.get("tags")));
        Ok(Some(s))
    }

    async fn update(
        &self,
        data: &ProviderData,
        prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        let c = data.kms().await;
        let w = what(planned);
        let id = prior.get("key_id").as_str().unwrap_or_default().to_string();
        if prior.get("description") != planned.get("description") {
            c.update_key_description()
                .key_id(&id)
                .description(planned.get("description").as_str().unwrap_or(""))
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "kms:UpdateKeyDescription"))?;
        }
        if prior.get("enable_key_rotation") != planned.get("enable_key_rotation")
            || (planned.get("enable_key_rotation").as_bool() == Some(true)
                && prior.get("rotation_period_in_days") != planned.get("rotation_period_in_days"))
        {
            set_rotation(c, &id, planned, &w).await?;
        }
        if prior.get("alias") != planned.get("alias") {
            if let Some(old) = prior.get("alias").as_str() {
                match c.delete_alias().alias_name(old).send().await {
                    Ok(_) => {}
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err(aws::diag(&e, &w, "kms:DeleteAlias")),
                }
            }
            if let Some(new) = planned.get("alias").as_str() {
                c.create_alias()
                    .alias_name(new)
                    .target_key_id(&id)
                    .send()
                    .await
                    .map_err(|e| aws::diag(&e, &w, "kms:CreateAlias"))?;
            }
        }
        let (old_tags, new_tags) = (
            prior.get("tags").as_string_map(),
            planned.get("tags").as_string_map(),
        );
        let (removed, set) = tag_diff(&old_tags, &new_tags);
        if !removed.is_empty() {
            c.untag_resource()
                .key_id(&id)
                .set_tag_keys(Some(removed))
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "kms:UntagResource"))?;
        }
        if !set.is_empty() {
            c.tag_resource()
                .key_id(&id)
                .set_tags(Some(kms_tags(&set)?))
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "kms:TagResource"))?;
        }
        Ok(planned.clone())
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let c = data.kms().await;
        let w = what(state);
        let Some(id) = state.get("key_id").as_str() else {
            return Ok(());
        };
        if let Some(alias) = state.get("alias").as_str() {
            match c.delete_alias().alias_name(alias).send().await {
                Ok(_) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(aws::diag(&e, &w, "kms:DeleteAlias")),
            }
        }
        let window = state.get("deletion_window_in_days").as_i64().unwrap_or(30) as i32;
        match c
            .schedule_key_deletion()
            .key_id(id)
            .pending_window_in_days(window)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            // Already pending deletion (deleted out of band) is what we wanted.
            Err(e) if e.code() == Some("KMSInvalidStateException") => Ok(()),
            Err(e) => Err(aws::diag(&e, &w, "kms:ScheduleKeyDeletion")),
        }
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        if id.is_empty() || id.contains(char::is_whitespace) {
            return Err(Diagnostics::single(
                "Invalid import ID",
                format!("{id:?} is not a KMS key id or ARN."),
            ));
        }
        // DescribeKey accepts ids and ARNs; read normalises to the id.
        Ok(Value::Object(BTreeMap::from([(
            "key_id".to_string(),
            Value::string(id),
        )])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::codec::from_json;

    fn validate(j: serde_json::Value) -> Vec<String> {
        let r = KmsKey;
        let schema = r.schema();
        let v = from_json(&j, &schema.block.ty(), &AttrPath::root(), 0).unwrap();
        let mut d = Diagnostics::new();
        schema.block.validate_config(&v, &AttrPath::root(), &mut d);
        r.validate(&v, &mut d);
        d.0.into_iter()
            .map(|d| d.path.map(|p| p.to_string()).unwrap_or_default())
            .collect()
    }

    #[test]
    fn ranges_and_combinations() {
        assert!(validate(serde_json::json!({})).is_empty());
        assert_eq!(
            validate(serde_json::json!({"deletion_window_in_days": 6})),
            vec!["deletion_window_in_days"]
        );
        assert_eq!(
            validate(serde_json::json!({"rotation_period_in_days": 2561})),
            vec!["rotation_period_in_days"]
        );
        assert_eq!(
            validate(serde_json::json!({"key_usage": "SIGN_VERIFY"})),
            vec!["key_spec"]
        );
        assert_eq!(
            validate(serde_json::json!({"key_spec": "ECC_NIST_P256"})),
            vec!["key_spec"]
        );
        assert_eq!(
            validate(
                serde_json::json!({"key_usage": "SIGN_VERIFY", "key_spec": "RSA_2048", "enable_key_rotation": true})
            ),
            vec!["enable_key_rotation"]
        );
        assert_eq!(
            validate(serde_json::json!({"alias": "alias/aws/x"})),
            vec!["alias"]
        );
        assert_eq!(
            validate(serde_json::json!({"key_usage": "WRAP"})),
            vec!["key_usage"]
        );
    }
}
