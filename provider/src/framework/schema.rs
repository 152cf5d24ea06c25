//! Schema model: what a provider, resource or data source accepts and exposes.
//!
//! Only constructs that exist in both protocol 5 and 6 are modelled (attributes and nested
//! blocks; no nested attribute types), so one schema serves both majors.

use std::collections::BTreeMap;

use super::diag::{AttrPath, Diagnostics};
use super::types::Type;
use super::value::Value;

/// A check applied to a known, non-null attribute value at validate time.
#[derive(Debug, Clone)]
pub enum Validator {
    /// Integer within `min..=max`.
    IntRange(i64, i64),
    /// String that is one of the listed values.
    OneOf(&'static [&'static str]),
    /// String length within `min..=max` characters.
    LenRange(usize, usize),
}

impl Validator {
    fn check(&self, v: &Value, path: &AttrPath, diags: &mut Diagnostics) {
        match self {
            Validator::IntRange(min, max) => {
                if let Value::Number(n) = v {
                    match n.as_i64() {
                        Some(i) if (*min..=*max).contains(&i) => {}
                        _ => diags.attr_error(
                            path.clone(),
                            "Value out of range",
                            format!(
                                "{path} must be a whole number between {min} and {max}, got {}.",
                                n.as_f64()
                            ),
                        ),
                    }
                }
            }
            Validator::OneOf(allowed) => {
                if let Value::String(s) = v
                    && !allowed.contains(&s.as_str())
                {
                    diags.attr_error(
                        path.clone(),
                        "Invalid value",
                        format!("{path} must be one of {}, got {s:?}.", allowed.join(", ")),
                    );
                }
            }
            Validator::LenRange(min, max) => {
                if let Value::String(s) = v {
                    let n = s.chars().count();
                    if n < *min || n > *max {
                        diags.attr_error(
                            path.clone(),
                            "Invalid length",
                            format!("{path} must be {min} to {max} characters long, got {n}."),
                        );
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attribute {
    pub name: &'static str,
    pub ty: Type,
    pub description: &'static str,
    pub required: bool,
    pub optional: bool,
    pub computed: bool,
    pub sensitive: bool,
    /// Changing the value requires destroying and re-creating the object.
    pub force_new: bool,
    /// Value planned when the configuration leaves the attribute unset (Optional+Computed).
    pub default: Option<Value>,
    pub validators: Vec<Validator>,
}

impl Attribute {
    fn new(name: &'static str, ty: Type) -> Self {
        Attribute {
            name,
            ty,
            description: "",
            required: false,
            optional: false,
            computed: false,
            sensitive: false,
            force_new: false,
            default: None,
            validators: Vec::new(),
        }
    }
    pub fn string(name: &'static str) -> Self {
        Self::new(name, Type::String)
    }
    pub fn number(name: &'static str) -> Self {
        Self::new(name, Type::Number)
    }
    pub fn bool(name: &'static str) -> Self {
        Self::new(name, Type::Bool)
    }
    pub fn string_map(name: &'static str) -> Self {
        Self::new(name, Type::map(Type::String))
    }
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
    pub fn computed(mut self) -> Self {
        self.computed = true;
        self
    }
    pub fn sensitive(mut self) -> Self {
        self.sensitive = true;
        self
    }
    pub fn force_new(mut self) -> Self {
        self.force_new = true;
        self
    }
    /// Optional+Computed with a default planned when unset.
    pub fn default(mut self, v: Value) -> Self {
        self.optional = true;
        self.computed = true;
        self.default = Some(v);
        self
    }
    pub fn describe(mut self, d: &'static str) -> Self {
        self.description = d;
        self
    }
    pub fn validate(mut self, v: Validator) -> Self {
        self.validators.push(v);
        self
    }
}

/// How a nested block repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nesting {
    Single,
    List,
    Set,
    Map,
    Group,
}

#[derive(Debug, Clone)]
pub struct NestedBlock {
    pub type_name: &'static str,
    pub block: Block,
    pub nesting: Nesting,
    pub min_items: i64,
    pub max_items: i64,
}

impl NestedBlock {
    pub fn ty(&self) -> Type {
        let inner = self.block.ty();
        match self.nesting {
            Nesting::Single | Nesting::Group => inner,
            Nesting::List => Type::list(inner),
            Nesting::Set => Type::set(inner),
            Nesting::Map => Type::map(inner),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Block {
    pub attributes: Vec<Attribute>,
    pub blocks: Vec<NestedBlock>,
    /// Markdown.
    pub description: &'static str,
}

impl Block {
    pub fn new(description: &'static str) -> Self {
        Block {
            description,
            ..Default::default()
        }
    }
    pub fn attr(mut self, a: Attribute) -> Self {
        self.attributes.push(a);
        self
    }
    pub fn block(mut self, b: NestedBlock) -> Self {
        self.blocks.push(b);
        self
    }

    /// The object type a value of this block has.
    pub fn ty(&self) -> Type {
        let mut m: BTreeMap<String, Type> = self
            .attributes
            .iter()
            .map(|a| (a.name.to_string(), a.ty.clone()))
            .collect();
        for b in &self.blocks {
            m.insert(b.type_name.to_string(), b.ty());
        }
        Type::Object(m)
    }

    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// Static checks every configuration gets: required/computed-only presence, validators,
    /// block item counts. Unknown values are skipped (they are checked again at apply).
    pub fn validate_config(&self, config: &Value, path: &AttrPath, diags: &mut Diagnostics) {
        for a in &self.attributes {
            let v = config.get(a.name);
            let p = path.join(a.name);
            if v.is_unknown() {
                continue;
            }
            if a.required && v.is_null() {
                diags.attr_error(
                    p.clone(),
                    "Missing required argument",
                    format!("The argument \"{}\" is required.", a.name),
                );
            }
            if a.computed && !a.optional && !v.is_null() {
                diags.attr_error(
                    p.clone(),
                    "Value for unconfigurable attribute",
                    format!(
                        "\"{}\" is set by the provider and cannot be configured.",
                        a.name
                    ),
                );
            }
            if !v.is_null() {
                for val in &a.validators {
                    val.check(v, &p, diags);
                }
            }
        }
        for b in &self.blocks {
            let v = config.get(b.type_name);
            let p = path.join(b.type_name);
            match (b.nesting, v) {
                (Nesting::Single | Nesting::Group, Value::Object(_)) => {
                    b.block.validate_config(v, &p, diags)
                }
                (Nesting::List | Nesting::Set, Value::List(items) | Value::Set(items)) => {
                    let n = items.len() as i64;
                    if n < b.min_items || (b.max_items > 0 && n > b.max_items) {
                        diags.attr_error(
                            p.clone(),
                            "Wrong number of blocks",
                            format!(
                                "\"{}\" needs between {} and {} blocks, got {n}.",
                                b.type_name, b.min_items, b.max_items
                            ),
                        );
                    }
                    for (i, it) in items.iter().enumerate() {
                        b.block.validate_config(it, &p.index(i as i64), diags);
                    }
                }
                (Nesting::Map, Value::Map(m)) => {
                    for (k, it) in m {
                        b.block.validate_config(it, &p.key(k), diags);
                    }
                }
                (Nesting::Single, Value::Null) if b.min_items > 0 => {
                    diags.attr_error(
                        p,
                        "Missing required block",
                        format!("A \"{}\" block is required.", b.type_name),
                    );
                }
                _ => {}
            }
        }
    }
}

/// A versioned schema; bumping `version` makes Terraform call UpgradeResourceState.
#[derive(Debug, Clone)]
pub struct Schema {
    pub version: i64,
    pub block: Block,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> Block {
        Block::new("test")
            .attr(Attribute::string("name").required())
            .attr(
                Attribute::number("n")
                    .default(Value::int(30))
                    .validate(Validator::IntRange(0, 43200)),
            )
            .attr(Attribute::string("arn").computed())
            .block(NestedBlock {
                type_name: "endpoints",
                block: Block::new("").attr(Attribute::string("sqs").optional()),
                nesting: Nesting::List,
                min_items: 0,
                max_items: 1,
            })
    }

    #[test]
    fn implied_type_includes_blocks() {
        let Type::Object(m) = block().ty() else {
            panic!()
        };
        assert!(matches!(m.get("endpoints"), Some(Type::List(_))));
        assert_eq!(m.get("n"), Some(&Type::Number));
    }

    #[test]
    fn validation_reports_paths() {
        let cfg = Value::Object(BTreeMap::from([
            ("name".into(), Value::Null),
            ("n".into(), Value::int(50000)),
            ("arn".into(), Value::string("x")),
            (
                "endpoints".into(),
                Value::List(vec![Value::Null, Value::Null]),
            ),
        ]));
        let mut d = Diagnostics::new();
        block().validate_config(&cfg, &AttrPath::root(), &mut d);
        let paths: Vec<String> =
            d.0.iter()
                .map(|d| d.path.as_ref().unwrap().to_string())
                .collect();
        assert_eq!(paths, vec!["name", "n", "arn", "endpoints"]);
    }

    #[test]
    fn unknown_values_skip_validation() {
        let cfg = Value::Object(BTreeMap::from([
            ("name".into(), Value::UNKNOWN),
            ("n".into(), Value::UNKNOWN),
        ]));
        let mut d = Diagnostics::new();
        block().validate_config(&cfg, &AttrPath::root(), &mut d);
        assert!(d.is_empty(), "{d}");
    }
}
