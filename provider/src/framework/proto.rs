//! Conversions between the framework model and the generated protocol types.
//!
//! tfplugin5 and tfplugin6 declare schemas and diagnostics with the same field names, so one
//! macro body produces the converters for both modules.

use super::codec::{self, CodecError};
use super::diag::{AttrPath, Diagnostics, Severity, Step};
use super::schema::{Block, Nesting, Schema};
use super::types::Type;
use super::value::Value;

macro_rules! converters {
    ($m:ident) => {
        pub mod $m {
            use super::*;
            use tfplugin_protocol::$m as pb;

            pub fn schema(s: &Schema) -> pb::Schema {
                pb::Schema {
                    version: s.version,
                    block: Some(block(&s.block, s.version)),
                }
            }

            fn block(b: &Block, version: i64) -> pb::schema::Block {
                pb::schema::Block {
                    version,
                    attributes: b
                        .attributes
                        .iter()
                        .map(|a| pb::schema::Attribute {
                            name: a.name.to_string(),
                            r#type: a.ty.to_json_bytes(),
                            description: a.description.to_string(),
                            required: a.required,
                            optional: a.optional,
                            computed: a.computed,
                            sensitive: a.sensitive,
                            description_kind: pb::StringKind::Markdown as i32,
                            ..Default::default()
                        })
                        .collect(),
                    block_types: b
                        .blocks
                        .iter()
                        .map(|nb| pb::schema::NestedBlock {
                            type_name: nb.type_name.to_string(),
                            block: Some(block(&nb.block, 0)),
                            nesting: match nb.nesting {
                                Nesting::Single => pb::schema::nested_block::NestingMode::Single,
                                Nesting::List => pb::schema::nested_block::NestingMode::List,
                                Nesting::Set => pb::schema::nested_block::NestingMode::Set,
                                Nesting::Map => pb::schema::nested_block::NestingMode::Map,
                                Nesting::Group => pb::schema::nested_block::NestingMode::Group,
                            } as i32,
                            min_items: nb.min_items,
                            max_items: nb.max_items,
                        })
                        .collect(),
                    description: b.description.to_string(),
                    description_kind: pb::StringKind::Markdown as i32,
                    deprecated: false,
                    deprecation_message: String::new(),
                }
            }

            pub fn path(p: &AttrPath) -> pb::AttributePath {
                use pb::attribute_path::step::Selector;
                pb::AttributePath {
                    steps: p
                        .0
                        .iter()
                        .map(|s| pb::attribute_path::Step {
                            selector: Some(match s {
                                Step::Attr(a) => Selector::AttributeName(a.clone()),
                                Step::Key(k) => Selector::ElementKeyString(k.clone()),
                                Step::Index(i) => Selector::ElementKeyInt(*i),
                            }),
                        })
                        .collect(),
                }
            }

            pub fn diags(d: &Diagnostics) -> Vec<pb::Diagnostic> {
                d.0.iter()
                    .map(|d| pb::Diagnostic {
                        severity: match d.severity {
                            Severity::Error => pb::diagnostic::Severity::Error,
                            Severity::Warning => pb::diagnostic::Severity::Warning,
                        } as i32,
                        summary: d.summary.clone(),
                        detail: d.detail.clone(),
                        attribute: d.path.as_ref().map(path),
                    })
                    .collect()
            }

            /// Decodes a DynamicValue (msgpack preferred, JSON accepted; absent = null).
            pub fn decode(dv: Option<&pb::DynamicValue>, ty: &Type) -> Result<Value, CodecError> {
                match dv {
                    None => Ok(Value::Null),
                    Some(dv) if !dv.msgpack.is_empty() => codec::decode_msgpack(&dv.msgpack, ty),
                    Some(dv) => codec::decode_json(&dv.json, ty),
                }
            }

            /// Encodes a value; the provider always answers in msgpack.
            pub fn encode(v: &Value, ty: &Type) -> Option<pb::DynamicValue> {
                Some(pb::DynamicValue {
                    msgpack: codec::encode_msgpack(v, ty),
                    json: Vec::new(),
                })
            }
        }
    };
}

converters!(tfplugin5);
converters!(tfplugin6);

/// A decode failure as a diagnostic: the input came from the client, so it is reported, never
/// unwrapped.
pub fn decode_error(what: &str, e: &CodecError) -> Diagnostics {
    Diagnostics::single(
        format!("Invalid {what}"),
        format!("The provider could not decode the {what} sent by Terraform: {e}."),
    )
}
