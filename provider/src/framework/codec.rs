//! DynamicValue codec: msgpack or JSON in, msgpack out, following cty's wire conventions.
//!
//! The msgpack reader is our own small parser rather than a generic msgpack library: input
//! comes from Terraform (or from a corrupted state file), and a generic decoder would
//! pre-allocate whatever length prefix the bytes claim. Here every length is checked against
//! the bytes actually left, nesting depth is bounded, and every failure is a `CodecError`.

use std::collections::BTreeMap;

use super::diag::AttrPath;
use super::types::Type;
use super::value::{Number, Refinements, Value};

/// msgpack extension type cty uses for a plain unknown value.
const EXT_UNKNOWN: i8 = 0;
/// msgpack extension type cty uses for an unknown value with refinements.
const EXT_REFINED_UNKNOWN: i8 = 12;
/// Deeper nesting than any schema we publish means the input is hostile or corrupt.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("truncated msgpack input")]
    Truncated,
    #[error("at {path}: {msg}")]
    Invalid { path: AttrPath, msg: String },
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("the value is nested too deeply")]
    TooDeep,
}

fn invalid(path: &AttrPath, msg: impl Into<String>) -> CodecError {
    CodecError::Invalid {
        path: path.clone(),
        msg: msg.into(),
    }
}

/// Decodes msgpack bytes as a value of type `ty`. Empty input is a null value (Terraform sends
/// an empty DynamicValue for "no value").
pub fn decode_msgpack(bytes: &[u8], ty: &Type) -> Result<Value, CodecError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let mut r = Reader { buf: bytes, pos: 0 };
    let v = r.value(ty, &AttrPath::root(), 0)?;
    let rest = bytes.len() - r.pos;
    if rest != 0 {
        return Err(CodecError::Trailing(rest));
    }
    Ok(v)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A msgpack header: what kind of item follows and its length where it has one.
enum Head {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(usize),
    Bin(usize),
    Array(usize),
    Map(usize),
    Ext(i8, usize),
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated)?;
        if end > self.buf.len() {
            return Err(CodecError::Truncated);
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn be(&mut self, n: usize) -> Result<u64, CodecError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn head(&mut self) -> Result<Head, CodecError> {
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Head::Int(i64::from(m)),
            0xe0..=0xff => Head::Int(i64::from(m as i8)),
            0x80..=0x8f => Head::Map(usize::from(m & 0x0f)),
            0x90..=0x9f => Head::Array(usize::from(m & 0x0f)),
            0xa0..=0xbf => Head::Str(usize::from(m & 0x1f)),
            0xc0 => Head::Nil,
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4 => Head::Bin(self.be(1)? as usize),
            0xc5 => Head::Bin(self.be(2)? as usize),
            0xc6 => Head::Bin(self.be(4)? as usize),
            0xc7 => {
                let n = self.be(1)? as usize;
                Head::Ext(self.u8()? as i8, n)
            }
            0xc8 => {
                let n = self.be(2)? as usize;
                Head::Ext(self.u8()? as i8, n)
            }
            0xc9 => {
                let n = self.be(4)? as usize;
                Head::Ext(self.u8()? as i8, n)
            }
            0xca => Head::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Head::Float(f64::from_bits(self.be(8)?)),
            0xcc => Head::UInt(self.be(1)?),
            0xcd => Head::UInt(self.be(2)?),
            0xce => Head::UInt(self.be(4)?),
            0xcf => Head::UInt(self.be(8)?),
            0xd0 => Head::Int(i64::from(self.be(1)? as u8 as i8)),
            0xd1 => Head::Int(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => Head::Int(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => Head::Int(self.be(8)? as i64),
            0xd4 => Head::Ext(self.u8()? as i8, 1),
            0xd5 => Head::Ext(self.u8()? as i8, 2),
            0xd6 => Head::Ext(self.u8()? as i8, 4),
            0xd7 => Head::Ext(self.u8()? as i8, 8),
            0xd8 => Head::Ext(self.u8()? as i8, 16),
            0xd9 => Head::Str(self.be(1)? as usize),
            0xda => Head::Str(self.be(2)? as usize),
            0xdb => Head::Str(self.be(4)? as usize),
            0xdc => Head::Array(self.be(2)? as usize),
            0xdd => Head::Array(self.be(4)? as usize),
            0xde => Head::Map(self.be(2)? as usize),
            0xdf => Head::Map(self.be(4)? as usize),
            0xc1 => {
                return Err(CodecError::Invalid {
                    path: AttrPath::root(),
                    msg: "reserved msgpack marker 0xc1".into(),
                });
            }
        })
    }

    /// Every array element / map entry takes at least one byte, so a count larger than the
    /// bytes left is a lie; rejecting it here keeps allocations proportional to the input.
    fn check_count(&self, n: usize, per_item: usize) -> Result<(), CodecError> {
        if n.saturating_mul(per_item) > self.remaining() {
            return Err(CodecError::Truncated);
        }
        Ok(())
    }

    fn string(&mut self, n: usize, path: &AttrPath) -> Result<String, CodecError> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid(path, "string is not valid UTF-8"))
    }

    fn value(&mut self, ty: &Type, path: &AttrPath, depth: usize) -> Result<Value, CodecError> {
        if depth > MAX_DEPTH {
            return Err(CodecError::TooDeep);
        }
        let head = self.head()?;
        match head {
            Head::Nil => return Ok(Value::Null),
            Head::Ext(code, n) => {
                let payload = self.take(n)?;
                return match code {
                    EXT_UNKNOWN => Ok(Value::Unknown(None)),
                    EXT_REFINED_UNKNOWN => Ok(Value::Unknown(Some(parse_refinements(payload)))),
                    other => Err(invalid(
                        path,
                        format!("unsupported msgpack extension type {other}"),
                    )),
                };
            }
            _ => {}
        }
        match ty {
            Type::Bool => match head {
                Head::Bool(b) => Ok(Value::Bool(b)),
                _ => Err(invalid(path, "expected a bool")),
            },
            Type::Number => match head {
                Head::Int(i) => Ok(Value::Number(Number::Int(i))),
                Head::UInt(u) => Ok(Value::Number(match i64::try_from(u) {
                    Ok(i) => Number::Int(i),
                    Err(_) => Number::Float(u as f64),
                })),
                Head::Float(f) if f.is_finite() => Ok(Value::Number(Number::Float(f))),
                // cty sends numbers that do not fit a float64 as decimal strings.
                Head::Str(n) => {
                    let s = self.string(n, path)?;
                    parse_number(&s).ok_or_else(|| invalid(path, format!("{s:?} is not a number")))
                }
                _ => Err(invalid(path, "expected a number")),
            },
            Type::String => match head {
                Head::Str(n) | Head::Bin(n) => Ok(Value::String(self.string(n, path)?)),
                _ => Err(invalid(path, "expected a string")),
            },
            Type::List(et) | Type::Set(et) => {
                let Head::Array(n) = head else {
                    return Err(invalid(path, format!("expected a {}", ty.friendly())));
                };
                self.check_count(n, 1)?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(et, &path.index(i as i64), depth + 1)?);
                }
                Ok(if matches!(ty, Type::List(_)) {
                    Value::List(items)
                } else {
                    Value::Set(items)
                })
            }
            Type::Map(et) => {
                let Head::Map(n) = head else {
                    return Err(invalid(path, format!("expected a {}", ty.friendly())));
                };
                self.check_count(n, 2)?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let k = self.key(path)?;
                    let v = self.value(et, &path.key(&k), depth + 1)?;
                    m.insert(k, v);
                }
                Ok(Value::Map(m))
            }
            Type::Object(attrs) => {
                let Head::Map(n) = head else {
                    return Err(invalid(path, "expected an object"));
                };
                self.check_count(n, 2)?;
                let mut m = BTreeMap::new();
                for _ in 0..n {
                    let k = self.key(path)?;
                    let Some(at) = attrs.get(&k) else {
                        return Err(invalid(path, format!("unexpected attribute {k:?}")));
                    };
                    let v = self.value(at, &path.join(&k), depth + 1)?;
                    m.insert(k, v);
                }
                // cty objects always carry every attribute; fill absent ones with null so the
                // rest of the provider never has to tell "absent" from "null".
                for k in attrs.keys() {
                    m.entry(k.clone()).or_insert(Value::Null);
                }
                Ok(Value::Object(m))
            }
        }
    }

    fn key(&mut self, path: &AttrPath) -> Result<String, CodecError> {
        match self.head()? {
            Head::Str(n) => self.string(n, path),
            _ => Err(invalid(path, "map key is not a string")),
        }
    }
}

fn parse_number(s: &str) -> Option<Value> {
    if let Ok(i) = s.parse::<i64>() {
        return Some(Value::Number(Number::Int(i)));
    }
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(|f| Value::Number(Number::Float(f)))
}

/// Reads the refinement map (integer keys) far enough to learn non-nullness; a payload we
/// cannot read still yields an unknown, just without refinements we understand.
fn parse_refinements(payload: &[u8]) -> Refinements {
    // Key 1 is "nullness": cty writes `false` there when the value is definitely not null.
    let mut not_null = false;
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    if let Ok(Head::Map(n)) = r.head() {
        for _ in 0..n.min(16) {
            let Ok(k) = r.head() else { break };
            let Ok(v) = r.head() else { break };
            match (k, v) {
                (Head::Int(1), Head::Bool(false)) => not_null = true,
                // Values other than scalars would need skipping; we stop at the first one
                // rather than mis-read the rest.
                (Head::Int(_), Head::Bool(_) | Head::Int(_) | Head::UInt(_) | Head::Nil) => {}
                (Head::Int(_), Head::Str(len)) if r.take(len).is_ok() => {}
                _ => break,
            }
        }
    }
    Refinements {
        not_null,
        raw: payload.to_vec(),
    }
}

/// Encodes a value of type `ty` as msgpack, the only encoding we ever send back.
pub fn encode_msgpack(v: &Value, ty: &Type) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_value(&mut out, v, ty);
    out
}

fn write_value(out: &mut Vec<u8>, v: &Value, ty: &Type) {
    use rmp::encode as e;
    // Writing into a Vec cannot fail, so the io results below are discarded on purpose.
    match v {
        Value::Null => {
            e::write_nil(out).ok();
        }
        Value::Unknown(None) => {
            e::write_ext_meta(out, 1, EXT_UNKNOWN).ok();
            out.push(0);
        }
        Value::Unknown(Some(r)) => {
            e::write_ext_meta(out, r.raw.len() as u32, EXT_REFINED_UNKNOWN).ok();
            out.extend_from_slice(&r.raw);
        }
        Value::Bool(b) => {
            e::write_bool(out, *b).ok();
        }
        Value::Number(Number::Int(i)) => {
            e::write_sint(out, *i).ok();
        }
        Value::Number(Number::Float(f)) => {
            e::write_f64(out, *f).ok();
        }
        Value::String(s) => {
            e::write_str(out, s).ok();
        }
        Value::List(items) | Value::Set(items) => {
            let et = match ty {
                Type::List(t) | Type::Set(t) => t.as_ref(),
                _ => &Type::String,
            };
            e::write_array_len(out, items.len() as u32).ok();
            for i in items {
                write_value(out, i, et);
            }
        }
        Value::Map(m) => {
            let et = match ty {
                Type::Map(t) => t.as_ref(),
                _ => &Type::String,
            };
            e::write_map_len(out, m.len() as u32).ok();
            for (k, v) in m {
                e::write_str(out, k).ok();
                write_value(out, v, et);
            }
        }
        Value::Object(m) => {
            // The type, not the value, decides which attributes are written: cty rejects
            // objects with missing or extra attributes.
            let Type::Object(attrs) = ty else {
                e::write_nil(out).ok();
                return;
            };
            e::write_map_len(out, attrs.len() as u32).ok();
            for (k, at) in attrs {
                e::write_str(out, k).ok();
                write_value(out, m.get(k).unwrap_or(&Value::Null), at);
            }
        }
    }
}

/// Decodes the JSON form of a DynamicValue (used by Terraform for stored state).
pub fn decode_json(bytes: &[u8], ty: &Type) -> Result<Value, CodecError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let j: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| CodecError::Json(e.to_string()))?;
    from_json(&j, ty, &AttrPath::root(), 0)
}

/// Converts an already parsed JSON value (e.g. raw state) to a value of type `ty`.
pub fn from_json(
    j: &serde_json::Value,
    ty: &Type,
    path: &AttrPath,
    depth: usize,
) -> Result<Value, CodecError> {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return Err(CodecError::TooDeep);
    }
    if j.is_null() {
        return Ok(Value::Null);
    }
    match (ty, j) {
        (Type::Bool, J::Bool(b)) => Ok(Value::Bool(*b)),
        // State written by some SDKs stores bools and numbers as strings; accept them.
        (Type::Bool, J::String(s)) if s == "true" || s == "false" => Ok(Value::Bool(s == "true")),
        (Type::Number, J::Number(n)) => Ok(Value::Number(match n.as_i64() {
            Some(i) => Number::Int(i),
            None => Number::Float(n.as_f64().unwrap_or(0.0)),
        })),
        (Type::Number, J::String(s)) => {
            parse_number(s).ok_or_else(|| invalid(path, format!("{s:?} is not a number")))
        }
        (Type::String, J::String(s)) => Ok(Value::String(s.clone())),
        (Type::String, J::Number(n)) => Ok(Value::String(n.to_string())),
        (Type::String, J::Bool(b)) => Ok(Value::String(b.to_string())),
        (Type::List(et) | Type::Set(et), J::Array(items)) => {
            let vals = items
                .iter()
                .enumerate()
                .map(|(i, it)| from_json(it, et, &path.index(i as i64), depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if matches!(ty, Type::List(_)) {
                Value::List(vals)
            } else {
                Value::Set(vals)
            })
        }
        (Type::Map(et), J::Object(m)) => Ok(Value::Map(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), from_json(v, et, &path.key(k), depth + 1)?)))
                .collect::<Result<_, CodecError>>()?,
        )),
        (Type::Object(attrs), J::Object(m)) => {
            let mut out = BTreeMap::new();
            for (k, v) in m {
                let Some(at) = attrs.get(k) else {
                    return Err(invalid(path, format!("unexpected attribute {k:?}")));
                };
                out.insert(k.clone(), from_json(v, at, &path.join(k), depth + 1)?);
            }
            for k in attrs.keys() {
                out.entry(k.clone()).or_insert(Value::Null);
            }
            Ok(Value::Object(out))
        }
        _ => Err(invalid(path, format!("expected a {}", ty.friendly()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj_ty() -> Type {
        Type::Object(BTreeMap::from([
            ("name".to_string(), Type::String),
            ("n".to_string(), Type::Number),
            ("on".to_string(), Type::Bool),
            ("tags".to_string(), Type::map(Type::String)),
            ("ids".to_string(), Type::list(Type::String)),
        ]))
    }

    #[test]
    fn roundtrip_object_with_unknowns() {
        let ty = obj_ty();
        let v = Value::Object(BTreeMap::from([
            ("name".to_string(), Value::string("q")),
            ("n".to_string(), Value::int(-5)),
            ("on".to_string(), Value::UNKNOWN),
            (
                "tags".to_string(),
                Value::Map(BTreeMap::from([("a".to_string(), Value::string("b"))])),
            ),
            ("ids".to_string(), Value::Null),
        ]));
        let bytes = encode_msgpack(&v, &ty);
        assert_eq!(decode_msgpack(&bytes, &ty).unwrap(), v);
    }

    #[test]
    fn unknown_is_ext0_and_refined_is_preserved() {
        assert_eq!(
            encode_msgpack(&Value::UNKNOWN, &Type::String),
            vec![0xd4, 0x00, 0x00]
        );
        // ext 12 carrying {1: false} = "definitely not null"
        let refined = [0xc7, 0x03, 0x0c, 0x81, 0x01, 0xc2];
        let v = decode_msgpack(&refined, &Type::String).unwrap();
        match &v {
            Value::Unknown(Some(r)) => assert!(r.not_null),
            other => panic!("expected refined unknown, got {other:?}"),
        }
        assert_eq!(encode_msgpack(&v, &Type::String), refined.to_vec());
    }

    #[test]
    fn big_numbers_as_strings() {
        let mut buf = Vec::new();
        rmp::encode::write_str(&mut buf, "12345678901234567890123").unwrap();
        assert!(matches!(
            decode_msgpack(&buf, &Type::Number).unwrap(),
            Value::Number(Number::Float(_))
        ));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let ty = obj_ty();
        // array32 claiming 4 billion elements, with nothing after it
        assert_eq!(
            decode_msgpack(&[0xdd, 0xff, 0xff, 0xff, 0xff], &Type::list(Type::String)),
            Err(CodecError::Truncated)
        );
        assert!(decode_msgpack(&[0x81, 0xa1, b'x', 0x01], &ty).is_err());
        assert!(decode_msgpack(&[0xc1], &ty).is_err());
        assert!(matches!(
            decode_msgpack(&[0xc0, 0xc0], &ty),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn json_state_decodes() {
        let ty = obj_ty();
        let v = decode_json(br#"{"name":"q","n":30,"on":true}"#, &ty).unwrap();
        assert_eq!(v.get("n"), &Value::int(30));
        assert_eq!(v.get("tags"), &Value::Null);
        assert!(decode_json(b"{", &ty).is_err());
    }
}
