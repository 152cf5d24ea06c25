//! Resources and data sources, one file each.

pub mod agent_policy;
pub mod agent_policy_agentic;
pub mod cluster;
pub mod edge_device;
pub mod gpu_node_pool;
pub mod keda_scaler;
pub mod kms_key;
pub mod platform;
pub mod queue;
pub mod queue_data;

use std::collections::BTreeMap;

use crate::framework::{AttrPath, Diagnostics, Value};

/// `type "name"` label used in diagnostics so the user sees which object failed.
pub fn label(type_name: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{type_name} {n:?}"),
        None => type_name.to_string(),
    }
}

/// Tags as read from AWS, expressed so an unchanged configuration plans no diff: an empty set
/// of tags reads back as whatever "empty" the prior state used (`null` or `{}`).
pub fn tags_value(actual: BTreeMap<String, String>, prior: &Value) -> Value {
    if actual.is_empty() {
        return match prior {
            Value::Map(m) if m.is_empty() => prior.clone(),
            _ => Value::Null,
        };
    }
    Value::from_string_map(actual)
}

/// Refuses a null value inside `tags`, naming the key. AWS has no null tag, so it could never be
/// stored, and the plan must equal the configuration, so it could not be planned away either:
/// accepted, it would plan the same diff after every apply.
pub fn validate_tags(config: &Value, diags: &mut Diagnostics) {
    let Value::Map(tags) = config.get("tags") else {
        return;
    };
    for (key, _) in tags.iter().filter(|(_, v)| v.is_null()) {
        let path = AttrPath::attr("tags").key(key);
        diags.attr_error(
            path.clone(),
            "Null tag value",
            format!("{path} is null: tag values must be strings. Remove the key, or set it to \"\" for a tag without a value."),
        );
    }
}

/// Keys to remove and pairs to add/change to go from `old` to `new` tags.
pub fn tag_diff(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> (Vec<String>, BTreeMap<String, String>) {
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    let set = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (removed, set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_diffs() {
        let old = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]);
        let new = BTreeMap::from([
            ("b".to_string(), "3".to_string()),
            ("c".to_string(), "4".to_string()),
        ]);
        let (rm, set) = tag_diff(&old, &new);
        assert_eq!(rm, vec!["a"]);
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn null_tag_values_are_refused_by_key() {
        let config = |tags: Value| Value::Object(BTreeMap::from([("tags".to_string(), tags)]));
        let tags = Value::Map(BTreeMap::from([
            ("env".to_string(), Value::string("test")),
            ("owner".to_string(), Value::Null),
            ("later".to_string(), Value::UNKNOWN),
        ]));
        let mut d = Diagnostics::new();
        validate_tags(&config(tags), &mut d);
        let found: Vec<(String, String)> =
            d.0.into_iter()
                .map(|d| (d.path.unwrap().to_string(), d.detail))
                .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, r#"tags["owner"]"#);
        assert!(
            found[0].1.starts_with(r#"tags["owner"] is null"#),
            "{found:?}"
        );

        let mut d = Diagnostics::new();
        validate_tags(&config(Value::Null), &mut d);
        validate_tags(&config(Value::UNKNOWN), &mut d);
        assert!(d.is_empty());
    }

    #[test]
    fn empty_tags_follow_prior_form() {
        assert_eq!(tags_value(BTreeMap::new(), &Value::Null), Value::Null);
        let empty = Value::Map(BTreeMap::new());
        assert_eq!(tags_value(BTreeMap::new(), &empty), empty);
    }
}
