//! cty types: the type system Terraform uses to describe attribute values on the wire.
//!
//! Schemas send types as JSON (`"string"`, `["list","string"]`, `["object",{...}]`), and the
//! msgpack/JSON value codecs need the type to interpret a value (a msgpack map is either an
//! object or a map; an array is a list or a set).

use std::collections::BTreeMap;

/// A cty type. Only the constructs our schemas use are modelled; tuples and `dynamic` are
/// rejected at decode time with a diagnostic rather than guessed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    Bool,
    Number,
    String,
    List(Box<Type>),
    Set(Box<Type>),
    Map(Box<Type>),
    Object(BTreeMap<String, Type>),
}

impl Type {
    pub fn list(t: Type) -> Self {
        Type::List(Box::new(t))
    }
    pub fn set(t: Type) -> Self {
        Type::Set(Box::new(t))
    }
    pub fn map(t: Type) -> Self {
        Type::Map(Box::new(t))
    }

    /// The JSON form used in `Schema.Attribute.type`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Type::Bool => json!("bool"),
            Type::Number => json!("number"),
            Type::String => json!("string"),
            Type::List(t) => json!(["list", t.to_json()]),
            Type::Set(t) => json!(["set", t.to_json()]),
            Type::Map(t) => json!(["map", t.to_json()]),
            Type::Object(attrs) => {
                let m: serde_json::Map<String, serde_json::Value> = attrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect();
                json!(["object", m])
            }
        }
    }

    /// Bytes for the `type` field of a schema attribute.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serialising a serde_json::Value cannot fail.
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }

    /// Human-readable name used in diagnostics ("list of string").
    pub fn friendly(&self) -> String {
        match self {
            Type::Bool => "bool".into(),
            Type::Number => "number".into(),
            Type::String => "string".into(),
            Type::List(t) => format!("list of {}", t.friendly()),
            Type::Set(t) => format!("set of {}", t.friendly()),
            Type::Map(t) => format!("map of {}", t.friendly()),
            Type::Object(_) => "object".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_forms_match_cty() {
        assert_eq!(Type::String.to_json_bytes(), br#""string""#);
        assert_eq!(
            Type::map(Type::String).to_json_bytes(),
            br#"["map","string"]"#
        );
        let obj = Type::Object(BTreeMap::from([("a".into(), Type::Number)]));
        assert_eq!(
            Type::list(obj).to_json_bytes(),
            br#"["list",["object",{"a":"number"}]]"#
        );
    }
}
