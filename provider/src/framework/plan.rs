//! Plan helpers: turn Terraform's proposed new state into the provider's planned state.
//!
//! Terraform's proposal already copies prior values into Optional+Computed attributes the
//! configuration leaves unset. On top of that we (1) plan defaults for unset attributes that
//! have one, (2) mark unset computed attributes unknown on create, and (3) list ForceNew
//! attributes whose value changes as `requires_replace`.

use super::diag::AttrPath;
use super::schema::{Block, Nesting};
use super::value::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub state: Value,
    pub requires_replace: Vec<AttrPath>,
}

/// Plans one resource instance. `prior` is null on create; `proposed` is null on destroy.
pub fn plan(block: &Block, prior: &Value, proposed: &Value, config: &Value) -> Planned {
    if proposed.is_null() {
        return Planned {
            state: Value::Null,
            requires_replace: Vec::new(),
        };
    }
    let mut state = proposed.clone();
    let mut requires_replace = Vec::new();
    plan_block(
        block,
        prior,
        &mut state,
        config,
        &AttrPath::root(),
        &mut requires_replace,
    );
    Planned {
        state,
        requires_replace,
    }
}

fn plan_block(
    block: &Block,
    prior: &Value,
    planned: &mut Value,
    config: &Value,
    path: &AttrPath,
    rr: &mut Vec<AttrPath>,
) {
    let creating = prior.is_null();
    for a in &block.attributes {
        let cfg = config.get(a.name);
        if a.computed && cfg.is_null() {
            if let Some(d) = &a.default {
                planned.set(a.name, d.clone());
            } else if creating {
                planned.set(a.name, Value::UNKNOWN);
            } else {
                planned.set(a.name, prior.get(a.name).clone());
            }
        }
        if a.force_new && !creating && planned.get(a.name) != prior.get(a.name) {
            rr.push(path.join(a.name));
        }
    }
    for b in &block.blocks {
        let p = path.join(b.type_name);
        let cfg = config.get(b.type_name).clone();
        let pri = prior.get(b.type_name).clone();
        let mut cur = planned.get(b.type_name).clone();
        match (b.nesting, &mut cur) {
            (Nesting::Single | Nesting::Group, Value::Object(_)) => {
                plan_block(&b.block, &pri, &mut cur, &cfg, &p, rr);
            }
            (Nesting::List, Value::List(items)) => {
                for (i, it) in items.iter_mut().enumerate() {
                    let pi = match &pri {
                        Value::List(v) => v.get(i).cloned().unwrap_or_default(),
                        _ => Value::Null,
                    };
                    let ci = match &cfg {
                        Value::List(v) => v.get(i).cloned().unwrap_or_default(),
                        _ => Value::Null,
                    };
                    plan_block(&b.block, &pi, it, &ci, &p.index(i as i64), rr);
                }
            }
            // Sets and maps of blocks are planned as configured: matching set elements to
            // prior elements needs identity rules no resource of ours needs yet.
            _ => {}
        }
        planned.set(b.type_name, cur);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::framework::schema::{Attribute, NestedBlock};

    fn block() -> Block {
        Block::new("")
            .attr(Attribute::string("name").required().force_new())
            .attr(Attribute::number("vis").default(Value::int(30)))
            .attr(Attribute::string("kms").optional().computed())
            .attr(Attribute::string("arn").computed())
            .block(NestedBlock {
                type_name: "ep",
                block: Block::new("")
                    .attr(Attribute::string("url").optional())
                    .attr(Attribute::string("id").computed()),
                nesting: Nesting::List,
                min_items: 0,
                max_items: 0,
            })
    }

    fn obj(pairs: &[(&str, Value)]) -> Value {
        let mut m: BTreeMap<String, Value> = ["name", "vis", "kms", "arn", "ep"]
            .iter()
            .map(|k| (k.to_string(), Value::Null))
            .collect();
        for (k, v) in pairs {
            m.insert(k.to_string(), v.clone());
        }
        Value::Object(m)
    }

    #[test]
    fn create_marks_computed_unknown_and_applies_defaults() {
        let cfg = obj(&[("name", Value::string("q"))]);
        let p = plan(&block(), &Value::Null, &cfg, &cfg);
        assert_eq!(p.state.get("vis"), &Value::int(30));
        assert_eq!(p.state.get("arn"), &Value::UNKNOWN);
        assert_eq!(p.state.get("kms"), &Value::UNKNOWN);
        assert!(p.requires_replace.is_empty());
    }

    #[test]
    fn update_keeps_prior_computed_and_flags_force_new() {
        let prior = obj(&[
            ("name", Value::string("q")),
            ("vis", Value::int(30)),
            ("kms", Value::string("k")),
            ("arn", Value::string("arn:q")),
        ]);
        let cfg = obj(&[("name", Value::string("q2"))]);
        // Terraform's proposal copies prior values of unset computed attributes.
        let proposed = obj(&[
            ("name", Value::string("q2")),
            ("vis", Value::int(30)),
            ("kms", Value::string("k")),
            ("arn", Value::string("arn:q")),
        ]);
        let p = plan(&block(), &prior, &proposed, &cfg);
        assert_eq!(p.state.get("arn"), &Value::string("arn:q"));
        assert_eq!(p.state.get("kms"), &Value::string("k"));
        assert_eq!(p.requires_replace, vec![AttrPath::attr("name")]);
    }

    #[test]
    fn unchanged_config_plans_prior_state() {
        let prior = obj(&[
            ("name", Value::string("q")),
            ("vis", Value::int(30)),
            ("kms", Value::string("k")),
            ("arn", Value::string("a")),
        ]);
        let cfg = obj(&[("name", Value::string("q"))]);
        let p = plan(&block(), &prior, &prior, &cfg);
        assert_eq!(p.state, prior);
        assert!(p.requires_replace.is_empty());
    }

    #[test]
    fn nested_block_computed_planned() {
        let ep = Value::Object(BTreeMap::from([
            ("url".into(), Value::string("u")),
            ("id".into(), Value::Null),
        ]));
        let cfg = obj(&[("name", Value::string("q")), ("ep", Value::List(vec![ep]))]);
        let p = plan(&block(), &Value::Null, &cfg, &cfg);
        let Value::List(items) = p.state.get("ep") else {
            panic!()
        };
        assert_eq!(items[0].get("id"), &Value::UNKNOWN);
    }

    #[test]
    fn destroy_plans_null() {
        let prior = obj(&[("name", Value::string("q"))]);
        assert_eq!(
            plan(&block(), &prior, &Value::Null, &Value::Null).state,
            Value::Null
        );
    }
}
