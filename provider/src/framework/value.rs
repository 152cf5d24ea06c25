//! The value model: what a Terraform value can be, with null, unknown and refined unknown kept
//! distinct.
//!
//! Unknown values only exist during planning (a value that will be known after apply). Since
//! Terraform 1.6 an unknown may carry refinements (e.g. "definitely not null", a string
//! prefix); we keep the raw refinement payload so a value we echo back is exactly the one we
//! received, and expose the one refinement we act on (non-nullness).

use std::collections::BTreeMap;

/// A number. cty numbers are arbitrary precision; everything our resources handle fits an
/// i64, so integers stay exact and anything else is an f64.
#[derive(Debug, Clone, Copy)]
pub enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    /// The value as an exact integer, if it is one.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Number::Int(i) => Some(i),
            Number::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
            Number::Float(_) => None,
        }
    }
}

impl PartialEq for Number {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a == b,
            _ => self.as_f64() == other.as_f64(),
        }
    }
}

/// Refinements attached to an unknown value.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Refinements {
    /// The value is known not to be null once it becomes known.
    pub not_null: bool,
    /// The msgpack payload exactly as received (ext type 12), re-emitted unchanged.
    pub raw: Vec<u8>,
}

/// A Terraform value.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    /// Unknown until apply. `None` = a plain unknown; `Some` = a refined unknown.
    Unknown(Option<Refinements>),
    Bool(bool),
    Number(Number),
    String(String),
    List(Vec<Value>),
    Set(Vec<Value>),
    Map(BTreeMap<String, Value>),
    Object(BTreeMap<String, Value>),
}

impl Value {
    pub const UNKNOWN: Value = Value::Unknown(None);

    pub fn string(s: impl Into<String>) -> Self {
        Value::String(s.into())
    }
    pub fn int(i: i64) -> Self {
        Value::Number(Number::Int(i))
    }
    /// A string, or null for `None`.
    pub fn opt_string(s: Option<impl Into<String>>) -> Self {
        s.map_or(Value::Null, |s| Value::String(s.into()))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
    pub fn is_unknown(&self) -> bool {
        matches!(self, Value::Unknown(_))
    }
    /// True when neither this value nor anything nested in it is unknown.
    pub fn is_wholly_known(&self) -> bool {
        match self {
            Value::Unknown(_) => false,
            Value::List(v) | Value::Set(v) => v.iter().all(Value::is_wholly_known),
            Value::Map(m) | Value::Object(m) => m.values().all(Value::is_wholly_known),
            _ => true,
        }
    }

    /// Attribute of an object value; null for anything else or a missing attribute.
    pub fn get(&self, name: &str) -> &Value {
        static NULL: Value = Value::Null;
        match self {
            Value::Object(m) => m.get(name).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// Sets an attribute on an object value (no-op on anything else).
    pub fn set(&mut self, name: &str, v: Value) {
        if let Value::Object(m) = self {
            m.insert(name.to_string(), v);
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    /// A map(string) as a Rust map; unknown/null → empty, non-string elements skipped.
    pub fn as_string_map(&self) -> BTreeMap<String, String> {
        match self {
            Value::Map(m) => m
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// A map(string) value from a Rust map; an empty map becomes null, which is how an unset
    /// optional map reads back and so avoids a perpetual `{} -> null` diff.
    pub fn from_string_map(m: BTreeMap<String, String>) -> Value {
        if m.is_empty() {
            Value::Null
        } else {
            Value::Map(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_unknown_and_refined_are_distinct() {
        let refined = Value::Unknown(Some(Refinements {
            not_null: true,
            raw: vec![0x81, 0x01, 0xc2],
        }));
        assert_ne!(Value::Null, Value::UNKNOWN);
        assert_ne!(Value::UNKNOWN, refined);
        assert!(refined.is_unknown() && !refined.is_null());
    }

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(Number::Int(30), Number::Float(30.0));
        assert_eq!(Number::Float(2.0).as_i64(), Some(2));
        assert_eq!(Number::Float(2.5).as_i64(), None);
    }
}
