//! What edgeinfer learns from, and fixes in, an ONNX graph before tract
//! loads it: quantization parameters of int8/uint8 inputs and outputs, and
//! rewrites of patterns that tract 0.23.9 computes wrongly.

use std::collections::HashMap;
use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, ModelProto, NodeProto, TensorProto};

/// A scale and zero point, as QuantizeLinear/DequantizeLinear use them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantParams {
    pub scale: f32,
    pub zero_point: i32,
}

/// Facts read from the graph, plus the rewrites applied to it.
#[derive(Debug, Clone, Default)]
pub struct GraphFacts {
    /// Per graph input (by name): where the input feeds a DequantizeLinear
    /// (possibly through layout ops), its parameters.
    pub input_quant: HashMap<String, QuantParams>,
    /// Per graph output (by name): where a QuantizeLinear produces it.
    pub output_quant: HashMap<String, QuantParams>,
    /// Human-readable notes of each rewrite, for logs and `models --check`.
    pub rewrites: Vec<String>,
    /// `If` nodes whose condition depends on data (not folded).
    pub data_branches: Vec<String>,
    /// Nodes of operators tract lacks that were not written out, and why.
    pub not_lowered: Vec<String>,
}

/// Ops that move or reshape data without changing values: the walk from an
/// int8 input to its DequantizeLinear may pass through them.
const LAYOUT_OPS: &[&str] = &[
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Flatten",
];

pub(super) fn scalar(init: &HashMap<&str, &TensorProto>, name: &str) -> Option<f64> {
    let t = init.get(name)?;
    if t.dims.iter().product::<i64>() != 1 {
        return None; // per-channel parameters are not a single scalar
    }
    let resolver = tract_onnx::data_resolver::default();
    let tensor = tract_onnx::tensor::load_tensor(&*resolver, t, None).ok()?;
    let tensor = tensor.cast_to::<f64>().ok()?.into_owned();
    tensor
        .try_as_plain_ram()
        .ok()?
        .as_slice::<f64>()
        .ok()?
        .first()
        .copied()
}

fn quant_of(init: &HashMap<&str, &TensorProto>, node: &NodeProto) -> Option<QuantParams> {
    quant_at(init, node, 1)
}

/// The scale at input `ix` of `node` and the zero point after it.
fn quant_at(
    init: &HashMap<&str, &TensorProto>,
    node: &NodeProto,
    ix: usize,
) -> Option<QuantParams> {
    let scale = scalar(init, node.input.get(ix)?)? as f32;
    let zero_point = match node.input.get(ix + 1) {
        Some(zp) if !zp.is_empty() => scalar(init, zp)? as i32,
        _ => 0,
    };
    Some(QuantParams { scale, zero_point })
}

/// Every top-level node whose operator `known` rejects, as
/// `OpType (domain) at node "name"`.
pub fn unsupported_operators(model: &ModelProto, known: impl Fn(&str) -> bool) -> Vec<String> {
    let Some(graph) = &model.graph else {
        return vec![];
    };
    graph
        .node
        .iter()
        .filter(|n| !known(&n.op_type))
        .map(|n| {
            let domain = if n.domain.is_empty() {
                String::new()
            } else {
                format!(" ({})", n.domain)
            };
            format!("{}{domain} at node {:?}", n.op_type, n.name)
        })
        .collect()
}

/// Reads quantization facts and applies the rewrites. Never fails: a graph
/// it does not understand is left as it is.
pub fn prepare(model: &mut ModelProto) -> GraphFacts {
    let mut facts = GraphFacts::default();
    let Some(graph) = model.graph.as_mut() else {
        return facts;
    };
    // Lowered first, so the facts below read the standard ops that replace
    // the com.microsoft ones.
    let lowered = super::lower::lower(graph);
    facts.rewrites.extend(lowered.notes);
    facts.not_lowered = lowered.declined;
    let (folded, on_data) = super::fold::fold_ifs(graph);
    facts.rewrites.extend(folded);
    facts.data_branches = on_data;

    {
        let init: HashMap<&str, &TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let consumers = |tensor: &str| -> Vec<&NodeProto> {
            graph
                .node
                .iter()
                .filter(|n| n.input.iter().any(|i| i == tensor))
                .collect()
        };
        for input in graph
            .input
            .iter()
            .filter(|i| !init.contains_key(i.name.as_str()))
        {
            let mut tensor = input.name.clone();
            for _ in 0..8 {
                let next = consumers(&tensor);
                let [node] = next.as_slice() else { break };
                if node.op_type == "DequantizeLinear" && node.input.first() == Some(&tensor) {
                    if let Some(q) = quant_of(&init, node) {
                        facts.input_quant.insert(input.name.clone(), q);
                    }
                    break;
                }
                if !LAYOUT_OPS.contains(&node.op_type.as_str()) || node.output.len() != 1 {
                    break;
                }
                tensor = node.output[0].clone();
            }
        }
        for output in &graph.output {
            if let Some(node) = graph
                .node
                .iter()
                .find(|n| n.output.first() == Some(&output.name))
            {
                // QuantizeLinear carries them at inputs 1 and 2; the QOperator
                // forms give the output's scale and zero point at 6 and 7.
                let at = match node.op_type.as_str() {
                    "QuantizeLinear" => Some(1),
                    "QLinearConv" | "QLinearMatMul" | "QLinearAdd" | "QLinearMul" => Some(6),
                    _ => None,
                };
                if let Some(q) = at.and_then(|ix| quant_at(&init, node, ix)) {
                    facts.output_quant.insert(output.name.clone(), q);
                }
            }
        }
    }

    rename_clashing_nodes(graph, &mut facts);
    rewrite_quantized_softmax(graph, &mut facts);
    facts
}

/// ONNX keeps node names apart from tensor names, but tract 0.23.9 puts
/// graph inputs, initializers and nodes in one namespace and refuses a
/// model where a node is called like an initializer or another node
/// ("duplicate name for node"). Such nodes get a unique name; only names
/// change, never the tensors they read or write.
fn rename_clashing_nodes(graph: &mut tract_onnx::pb::GraphProto, facts: &mut GraphFacts) {
    let mut taken: std::collections::HashSet<String> = graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(graph.initializer.iter().map(|t| t.name.clone()))
        .collect();
    for node in &mut graph.node {
        if node.name.is_empty() {
            continue;
        }
        if taken.insert(node.name.clone()) {
            continue;
        }
        let fresh = (1..)
            .map(|n| format!("{}.{n}", node.name))
            .find(|c| !taken.contains(c))
            .expect("an unused name");
        facts.rewrites.push(format!(
            "{} node {:?} renamed {fresh:?} (its name was taken; tract needs unique names)",
            node.op_type, node.name
        ));
        taken.insert(fresh.clone());
        node.name = fresh;
    }
}

/// tract 0.23.9 returns the saturated value (127) for every element of
/// `Softmax → QuantizeLinear` (measured on the MLPerf Tiny int8 models;
/// the graph up to the Softmax matches onnxruntime exactly). The
/// QuantizeLinear is replaced by its definition in float ops —
/// `Cast(Clip(Round(x / scale) + zero_point, lo, hi))`, Round being
/// half-to-even like QuantizeLinear — which tract computes correctly.
fn rewrite_quantized_softmax(graph: &mut tract_onnx::pb::GraphProto, facts: &mut GraphFacts) {
    let producers: HashMap<String, String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.clone(), n.op_type.clone())))
        .collect();
    let init: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let mut new_nodes = Vec::with_capacity(graph.node.len());
    let mut new_inits = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        let fed_by_softmax = node.op_type == "QuantizeLinear"
            && node
                .input
                .first()
                .and_then(|i| producers.get(i))
                .is_some_and(|op| op == "Softmax");
        let params = if fed_by_softmax {
            let init_ref: HashMap<&str, &TensorProto> =
                init.iter().map(|(k, v)| (k.as_str(), v)).collect();
            quant_of(&init_ref, &node).map(|q| {
                let signed = node
                    .input
                    .get(2)
                    .and_then(|zp| init.get(zp))
                    .map(|t| t.data_type != DataType::Uint8 as i32)
                    .unwrap_or(false);
                (q, signed)
            })
        } else {
            None
        };
        let Some((q, signed)) = params else {
            new_nodes.push(node);
            continue;
        };
        let base = if node.name.is_empty() {
            node.output[0].clone()
        } else {
            node.name.clone()
        };
        let name = |s: &str| format!("{base}/edgeinfer_{s}");
        let (lo, hi, to) = if signed {
            (-128.0, 127.0, DataType::Int8)
        } else {
            (0.0, 255.0, DataType::Uint8)
        };
        for (n, v) in [
            ("scale", q.scale),
            ("zero_point", q.zero_point as f32),
            ("lo", lo),
            ("hi", hi),
        ] {
            new_inits.push(TensorProto {
                name: name(n),
                data_type: DataType::Float as i32,
                float_data: vec![v],
                ..Default::default()
            });
        }
        let x = node.input[0].clone();
        let y = node.output[0].clone();
        let op = |op: &str, inputs: Vec<String>, output: String| NodeProto {
            op_type: op.into(),
            name: format!("{output}_node"),
            input: inputs,
            output: vec![output],
            ..Default::default()
        };
        new_nodes.push(op("Div", vec![x.clone(), name("scale")], name("scaled")));
        new_nodes.push(op("Round", vec![name("scaled")], name("rounded")));
        new_nodes.push(op(
            "Add",
            vec![name("rounded"), name("zero_point")],
            name("shifted"),
        ));
        new_nodes.push(op(
            "Clip",
            vec![name("shifted"), name("lo"), name("hi")],
            name("clipped"),
        ));
        let mut cast = op("Cast", vec![name("clipped")], y.clone());
        cast.attribute.push(AttributeProto {
            name: "to".into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Int as i32,
            i: to as i64,
            ..Default::default()
        });
        new_nodes.push(cast);
        facts.rewrites.push(format!(
            "QuantizeLinear {:?} after Softmax computed in float (tract 0.23.9 saturates it)",
            node.name
        ));
    }
    graph.node = new_nodes;
    graph.initializer.extend(new_inits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn clashing_model() -> ModelProto {
        let two = TensorProto {
            name: "two".into(),
            data_type: DataType::Float as i32,
            dims: vec![1],
            float_data: vec![2.0],
            ..Default::default()
        };
        let node = |name: &str, inputs: &[&str], output: &str| NodeProto {
            name: name.into(),
            op_type: "Mul".into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        };
        // A node named like the initializer, and two nodes with one name.
        crate::model::test_graphs::model(
            "clash",
            vec![
                node("two", &["x", "two"], "y"),
                node("twice", &["y", "two"], "z"),
                node("twice", &["z", "two"], "out"),
            ],
            vec![two],
            vec![crate::model::test_graphs::float_value("x", &[1, 3])],
            vec![crate::model::test_graphs::float_value("out", &[1, 3])],
        )
    }

    #[test]
    fn nodes_named_like_an_initializer_or_each_other_are_renamed_and_load() {
        let loader = tract_onnx::onnx();
        let mut proto = clashing_model();
        let refused = loader
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_optimized())
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            refused.to_lowercase().contains("duplicate"),
            "tract refuses the clashing names as they are: {refused:?}"
        );
        let facts = prepare(&mut proto);
        assert_eq!(facts.rewrites.len(), 2, "{:?}", facts.rewrites);
        let names: Vec<&str> = proto
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(names, ["two.1", "twice", "twice.1"]);
        let model = loader
            .model_for_proto_model(&proto)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let out = model
            .run(tvec!(tensor1(&[1.0f32, 2.0, 3.0])
                .into_shape(&[1, 3])
                .unwrap()
                .into()))
            .unwrap();
        let values = out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        assert_eq!(values, [8.0, 16.0, 24.0]);
    }
}
