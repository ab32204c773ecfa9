//! ONNX graphs built in tests (opset 13, float tensors), so that a test
//! says only what its graph holds.

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use tract_onnx::prelude::*;

/// A node named after its one output.
pub fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|i| i.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

/// A float tensor of a fixed shape, as a graph input or output.
pub fn float_value(name: &str, dims: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(dimension::Value::DimValue(*d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A graph output whose type tract infers.
pub fn untyped_value(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        ..Default::default()
    }
}

/// A model of opset 13 holding one graph.
pub fn model(
    name: &str,
    node: Vec<NodeProto>,
    initializer: Vec<TensorProto>,
    input: Vec<ValueInfoProto>,
    output: Vec<ValueInfoProto>,
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: name.into(),
            node,
            initializer,
            input,
            output,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An attribute of integers (`kernel_shape`, `strides`, `pads`, `perm`).
pub fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.iter().map(|x| *x as i64).collect(),
        ..Default::default()
    }
}

/// A float initializer of shape `dims`.
pub fn float_tensor(name: &str, dims: &[usize], data: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Float as i32,
        dims: dims.iter().map(|d| *d as i64).collect(),
        float_data: data,
        ..Default::default()
    }
}

/// `proto`'s optimised plan as tract makes it and after `substitute`, run
/// on one seeded input of shape `input`: the same first output, and no
/// node left that `replaced` picks out. Returns how many `substitute`
/// replaced, which must be how many `replaced` picked out before.
pub fn optimised_plans_agree(
    proto: &ModelProto,
    input: &[usize],
    substitute: fn(&mut TypedModel) -> TractResult<usize>,
    replaced: fn(&TypedNode) -> bool,
) -> usize {
    let optimized = tract_onnx::onnx()
        .model_for_proto_model(proto)
        .unwrap()
        .into_optimized()
        .unwrap();
    let theirs = optimized.nodes().iter().filter(|n| replaced(n)).count();
    let mut ours = optimized.clone();
    assert_eq!(substitute(&mut ours).unwrap(), theirs, "{optimized}");
    assert!(!ours.nodes().iter().any(replaced));
    let mut rng = fastrand::Rng::with_seed(3);
    let x: Vec<f32> = (0..input.iter().product())
        .map(|_| rng.f32() * 4.0 - 2.0)
        .collect();
    let x = Tensor::from_shape(input, &x).unwrap();
    let a = optimized
        .into_runnable()
        .unwrap()
        .run(tvec!(x.clone().into()))
        .unwrap();
    let b = ours.into_runnable().unwrap().run(tvec!(x.into())).unwrap();
    assert_eq!(a[0], b[0]);
    theirs
}

/// `proto` decluttered, planned as tract plans it and after `substitute`,
/// each run on `x`: (how many `substitute` replaced, tract's first
/// output, ours).
pub fn decluttered_plans(
    proto: &ModelProto,
    x: &Tensor,
    substitute: impl FnOnce(&mut TypedModel) -> TractResult<usize>,
) -> (usize, Tensor, Tensor) {
    let typed = tract_onnx::onnx()
        .model_for_proto_model(proto)
        .unwrap()
        .into_typed()
        .unwrap()
        .into_decluttered()
        .unwrap();
    let mut ours = typed.clone();
    let n = substitute(&mut ours).unwrap();
    let run = |model: TypedModel| {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        plan.run(tvec!(x.clone().into_tvalue()))
            .unwrap()
            .remove(0)
            .into_tensor()
    };
    (n, run(typed), run(ours))
}

/// A tensor of `shape` with values in [-4, 4) from a generator seeded
/// with `seed`. (Its tests are those of the x86-64-only ops.)
#[cfg(target_arch = "x86_64")]
pub fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = fastrand::Rng::with_seed(seed);
    let x: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.f32() * 8.0 - 4.0)
        .collect();
    Tensor::from_shape(shape, &x).unwrap()
}
