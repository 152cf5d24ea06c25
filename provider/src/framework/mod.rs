//! A small provider framework: schema, values, codec, diagnostics, planning, and the gRPC
//! services for protocols 5 and 6 driven by one [`resource::Provider`] definition.

pub mod codec;
pub mod diag;
pub mod plan;
pub mod proto;
pub mod resource;
pub mod schema;
pub mod server;
pub mod types;
pub mod v5;
pub mod value;

pub use diag::{AttrPath, Diagnostics};
pub use resource::{DataSource, Provider, Resource};
pub use schema::{Attribute, Block, NestedBlock, Nesting, Schema, Validator};
pub use types::Type;
pub use value::Value;
