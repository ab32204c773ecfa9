//! A tract variant for QDQ models: activation QuantizeLinear →
//! DequantizeLinear pairs folded away, so that tract runs float between the
//! layers instead of rounding every activation onto the int8 grid.
//!
//! tract 0.23.9 does not fuse QDQ convolutions into an integer kernel: it
//! runs each Conv in f32, and each activation pair between them (one fused
//! pass since `kernels/fakequant.rs`, which keeps tract's answers).
//! Folding a pair keeps what it does to the range — `Clip` to what the
//! quantized type can hold, which is also where a converter hides a fused
//! ReLU/ReLU6 — and drops the rounding. Answers therefore move (by a few
//! quantization steps at an int8 output), so the variant is never served
//! blindly: `auto` holds it to the same agreement rule as any other engine
//! (see `choice/`).
//!
//! Left as they are: the graph's input DequantizeLinear and output
//! QuantizeLinear (the model's contract), weights' DequantizeLinear of
//! initializers (tract folds those constants at load), per-channel
//! activation quantization, and pairs whose parameters differ.

use super::graph::scalar;
use std::collections::{HashMap, HashSet};
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, ModelProto, NodeProto,
    TensorProto,
};

/// What [`fold_activations`] built: the edited model and how many pairs it
/// folded.
pub struct Folded {
    pub model: ModelProto,
    pub pairs: usize,
}

/// The variant's name in `models`, health and the engine-choice cache.
pub const VARIANT: &str = "qdq-folded";

/// The model with every foldable activation pair replaced by a `Clip` to
/// the quantized range; `None` when there is nothing to fold (then the
/// variant is the graph as given).
pub fn fold_activations(model: &ModelProto) -> Option<Folded> {
    let graph = model.graph.as_ref()?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version);
    let init: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for input in &n.input {
            consumers.entry(input.as_str()).or_default().push(i);
        }
    }
    let is =
        |n: &NodeProto, op: &str| n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx");

    // Per folded QuantizeLinear (by index): the clip range; per folded
    // DequantizeLinear: the QuantizeLinear it undoes.
    let mut dropped: HashSet<usize> = HashSet::new();
    let mut clip_for: HashMap<usize, (String, f32, f32)> = HashMap::new();
    for (qi, q) in graph.node.iter().enumerate() {
        if !is(q, "QuantizeLinear") || q.output.len() != 1 {
            continue;
        }
        let Some(params) = scalar_params(&init, q) else {
            continue;
        };
        let out = q.output[0].as_str();
        if outputs.contains(out) {
            continue;
        }
        let Some(users) = consumers.get(out) else {
            continue;
        };
        let all_undo = users.iter().all(|&d| {
            let dq = &graph.node[d];
            is(dq, "DequantizeLinear")
                && dq.input.first().map(String::as_str) == Some(out)
                && scalar_params(&init, dq) == Some(params)
        });
        if !all_undo {
            continue;
        }
        let (scale, zero_point, lo, hi) = params;
        let low = (lo - zero_point) as f32 * scale;
        let high = (hi - zero_point) as f32 * scale;
        dropped.insert(qi);
        for &d in users {
            clip_for.insert(d, (q.input[0].clone(), low, high));
        }
    }
    if dropped.is_empty() {
        return None;
    }

    let mut names = super::names::Names::of(graph);
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut inits = Vec::new();
    for (i, node) in graph.node.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let Some((x, low, high)) = clip_for.get(&i) else {
            nodes.push(node.clone());
            continue;
        };
        let y = node.output[0].clone();
        let t = &mut names;
        let mut constant = |t: &mut super::names::Names, what: &str, v: f32| {
            let name = t.fresh(&format!("{y}/{what}/edgeinfer_fold"));
            inits.push(TensorProto {
                name: name.clone(),
                data_type: DataType::Float as i32,
                float_data: vec![v],
                ..Default::default()
            });
            name
        };
        let (min, max) = if opset >= 11 {
            (
                Some(constant(t, "min", *low)),
                Some(constant(t, "max", *high)),
            )
        } else {
            (None, None)
        };
        let mut clip = NodeProto {
            op_type: "Clip".into(),
            name: t.fresh(&format!("{y}/Clip/edgeinfer_fold")),
            input: vec![x.clone()],
            output: vec![y],
            ..Default::default()
        };
        match (min, max) {
            (Some(min), Some(max)) => clip.input.extend([min, max]),
            _ => {
                for (what, v) in [("min", *low), ("max", *high)] {
                    clip.attribute.push(AttributeProto {
                        name: what.into(),
                        r#type: AttributeType::Float as i32,
                        f: v,
                        ..Default::default()
                    });
                }
            }
        }
        nodes.push(clip);
    }
    let pairs = dropped.len();
    let mut model = model.clone();
    let g = model.graph.as_mut()?;
    g.node = nodes;
    g.initializer.extend(inits);
    Some(Folded { model, pairs })
}

/// Scale, zero point and the integer range of a per-tensor
/// QuantizeLinear/DequantizeLinear whose parameters are initializers.
fn scalar_params(
    init: &HashMap<&str, &TensorProto>,
    node: &NodeProto,
) -> Option<(f32, i64, i64, i64)> {
    let scale = scalar(init, node.input.get(1)?)? as f32;
    let (zero_point, lo, hi) = match node.input.get(2).filter(|z| !z.is_empty()) {
        // ONNX: without a zero point the quantized type is uint8, zero 0.
        None => (0, 0, 255),
        Some(zp) => {
            let (lo, hi) = match DataType::try_from(init.get(zp.as_str())?.data_type).ok()? {
                DataType::Int8 => (-128, 127),
                DataType::Uint8 => (0, 255),
                DataType::Int16 => (-32768, 32767),
                DataType::Uint16 => (0, 65535),
                _ => return None,
            };
            (scalar(init, zp)? as i64, lo, hi)
        }
    };
    (scale.is_finite() && scale > 0.0).then_some((scale, zero_point, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> ModelProto {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quantized/qdq_u8s8.onnx"
        );
        crate::model::backend::tract::decode(&std::fs::read(path).unwrap()).unwrap()
    }

    fn count(m: &ModelProto, op: &str) -> usize {
        let g = m.graph.as_ref().unwrap();
        g.node.iter().filter(|n| n.op_type == op).count()
    }

    #[test]
    fn activation_pairs_fold_and_the_model_contract_stays() {
        let given = fixture();
        let outputs: Vec<String> = given
            .graph
            .as_ref()
            .unwrap()
            .output
            .iter()
            .map(|o| o.name.clone())
            .collect();
        {
            let f = fold_activations(&given).expect("the fixture has activation pairs");
            assert!(f.pairs > 0);
            assert_eq!(
                count(&f.model, "QuantizeLinear"),
                count(&given, "QuantizeLinear") - f.pairs
            );
            assert_eq!(count(&f.model, "Clip"), count(&given, "Clip") + f.pairs);
            // What is left quantizes a graph output or feeds something other
            // than a DequantizeLinear with its own parameters.
            let g = f.model.graph.as_ref().unwrap();
            for q in g.node.iter().filter(|n| n.op_type == "QuantizeLinear") {
                let users: Vec<&NodeProto> = g
                    .node
                    .iter()
                    .filter(|n| n.input.contains(&q.output[0]))
                    .collect();
                assert!(
                    outputs.contains(&q.output[0])
                        || users.iter().any(|u| u.op_type != "DequantizeLinear"),
                    "{q:?} was foldable"
                );
            }
        }
    }

    #[test]
    fn a_graph_without_activation_pairs_has_no_variant() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/quantized/dyn_u8.onnx"
        );
        let m = crate::model::backend::tract::decode(&std::fs::read(path).unwrap()).unwrap();
        assert!(fold_activations(&m).is_none());
    }
}
