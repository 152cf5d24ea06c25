//! Resources and data sources, one file each.

pub mod agent_policy;
pub mod cluster;
pub mod edge_device;
pub mod gpu_node_pool;
pub mod keda_scaler;
pub mod kms_key;
pub mod platform;
pub mod queue;
pub mod queue_data;

use std::collections::BTreeMap;

use crate::framework::Value;

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
    fn empty_tags_follow_prior_form() {
        assert_eq!(tags_value(BTreeMap::new(), &Value::Null), Value::Null);
        let empty = Value::Map(BTreeMap::new());
        assert_eq!(tags_value(BTreeMap::new(), &empty), empty);
    }
}
