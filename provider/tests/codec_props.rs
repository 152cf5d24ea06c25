//! Property tests over the DynamicValue decoder: arbitrary bytes never panic (they decode or
//! produce an error), and encoded values decode back to themselves.

use std::collections::BTreeMap;

use proptest::prelude::*;
use terraform_provider_agentplane::framework::codec::{
    decode_json, decode_msgpack, encode_msgpack,
};
use terraform_provider_agentplane::framework::value::{Number, Value};
use terraform_provider_agentplane::framework::{Provider, Resource, Type};
use terraform_provider_agentplane::resources::queue::Queue;

fn types() -> Vec<Type> {
    vec![
        Type::String,
        Type::Number,
        Type::Bool,
        Type::list(Type::String),
        Type::map(Type::Number),
        Type::set(Type::Object(BTreeMap::from([
            ("a".into(), Type::String),
            ("b".into(), Type::list(Type::Bool)),
        ]))),
        Queue.schema().block.ty(),
        terraform_provider_agentplane::AgentplaneProvider
            .schema()
            .block
            .ty(),
    ]
}

/// Values of the queue's object type, with unknowns and nulls mixed in.
fn leaf(ty: Type) -> BoxedStrategy<Value> {
    let special = prop_oneof![Just(Value::Null), Just(Value::UNKNOWN)];
    let base: BoxedStrategy<Value> = match ty {
        Type::String => any::<String>().prop_map(Value::String).boxed(),
        Type::Number => prop_oneof![
            any::<i64>().prop_map(|i| Value::Number(Number::Int(i))),
            (-1e300f64..1e300).prop_map(|f| Value::Number(Number::Float(f)))
        ]
        .boxed(),
        Type::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        Type::Map(t) => prop::collection::btree_map("[a-z]{0,8}", leaf(*t), 0..4)
            .prop_map(Value::Map)
            .boxed(),
        Type::List(t) => prop::collection::vec(leaf(*t), 0..4)
            .prop_map(Value::List)
            .boxed(),
        Type::Set(t) => prop::collection::vec(leaf(*t), 0..4)
            .prop_map(Value::Set)
            .boxed(),
        Type::Object(attrs) => {
            let parts: Vec<BoxedStrategy<(String, Value)>> = attrs
                .into_iter()
                .map(|(k, t)| leaf(t).prop_map(move |v| (k.clone(), v)).boxed())
                .collect();
            parts
                .prop_map(|kv| Value::Object(kv.into_iter().collect()))
                .boxed()
        }
    };
    prop_oneof![1 => special, 4 => base].boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for ty in types() {
            let _ = decode_msgpack(&bytes, &ty);
            let _ = decode_json(&bytes, &ty);
        }
    }

    #[test]
    fn mutated_valid_input_never_panics(v in leaf(Queue.schema().block.ty()), pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let ty = Queue.schema().block.ty();
        let mut bytes = encode_msgpack(&v, &ty);
        if !bytes.is_empty() {
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = decode_msgpack(&bytes, &ty);
            let _ = decode_msgpack(&bytes[..cut % bytes.len()], &ty);
        }
    }

    #[test]
    fn roundtrip(v in leaf(Queue.schema().block.ty())) {
        let ty = Queue.schema().block.ty();
        let bytes = encode_msgpack(&v, &ty);
        let back = decode_msgpack(&bytes, &ty).unwrap();
        prop_assert_eq!(back, v);
    }
}
