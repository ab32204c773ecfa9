//! Folding on the ONNX graph before either engine sees it:
//!
//! - `[[constant]]` inputs (a sample rate, say) become initializers, for
//!   both engines (ONNX Runtime gets the re-encoded graph);
//! - scikit-learn's ZipMap (probabilities as a sequence of maps, which
//!   neither engine hands over as a tensor) is dropped, for both engines:
//!   the probabilities tensor it wraps becomes the output;
//! - an `If` whose condition is computable from initializers is replaced by
//!   the branch it takes (Silero VAD branches on its sample rate, and its
//!   two branches give outputs of different shapes, which tract cannot
//!   analyse together). An `If` on data stays; where tract then fails, the
//!   error says which node branches on data.

use super::manifest::ConstantSpec;
use std::collections::{HashMap, HashSet};
use tract_onnx::pb::{
    tensor_proto::DataType, tensor_shape_proto::dimension, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, TensorProto,
};

/// Turns each `[[constant]]` input into an initializer holding its value.
/// The input's element type and shape are the graph's; a dimension the
/// graph leaves open is 1 (or the value count, for a 1-D input).
pub fn bind_constants(model: &mut ModelProto, constants: &[ConstantSpec]) -> Result<(), String> {
    let Some(graph) = model.graph.as_mut() else {
        return Err("the model has no graph".into());
    };
    for c in constants {
        let Some(at) = graph.input.iter().position(|i| i.name == c.input) else {
            let names: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
            return Err(format!(
                "constant {:?}: the graph has no such input (inputs: {})",
                c.input,
                names.join(", ")
            ));
        };
        let values = c.value.values();
        let Some(type_proto::Value::TensorType(t)) = graph.input[at]
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref())
        else {
            return Err(format!("constant {:?}: the input is not a tensor", c.input));
        };
        let declared: Vec<Option<i64>> = t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(dimension::Value::DimValue(v)) => Some(v),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let open = declared.iter().filter(|d| d.is_none()).count();
        let dims: Vec<i64> = declared
            .iter()
            .map(|d| match d {
                Some(v) => *v,
                None if open == 1 && declared.len() == 1 => values.len() as i64,
                None => 1,
            })
            .collect();
        let count: i64 = dims.iter().product();
        if count != values.len() as i64 {
            return Err(format!(
                "constant {:?}: {} value(s) given, the input has shape {dims:?} ({count} elements)",
                c.input,
                values.len()
            ));
        }
        let mut tensor = TensorProto {
            name: c.input.clone(),
            data_type: t.elem_type,
            dims,
            ..Default::default()
        };
        let integral = values.iter().all(|v| v.fract() == 0.0);
        match DataType::try_from(t.elem_type) {
            Ok(DataType::Float) => tensor.float_data = values.iter().map(|v| *v as f32).collect(),
            Ok(DataType::Double) => tensor.double_data = values.clone(),
            Ok(DataType::Int64) if integral => {
                tensor.int64_data = values.iter().map(|v| *v as i64).collect()
            }
            Ok(DataType::Int32 | DataType::Int16 | DataType::Int8 | DataType::Uint8)
                if integral =>
            {
                tensor.int32_data = values.iter().map(|v| *v as i32).collect()
            }
            Ok(DataType::Bool) if values.iter().all(|v| *v == 0.0 || *v == 1.0) => {
                tensor.int32_data = values.iter().map(|v| *v as i32).collect()
            }
            other => {
                return Err(format!(
                    "constant {:?}: the input's type {} does not take the value {:?}",
                    c.input,
                    other.map(|d| d.as_str_name()).unwrap_or("(unknown)"),
                    values
                ))
            }
        }
        graph.input.remove(at);
        graph.initializer.retain(|i| i.name != c.input);
        graph.initializer.push(tensor);
    }
    Ok(())
}

/// Replaces each ZipMap by an Identity of the probabilities it wraps, and
/// declares the output a float tensor. Returns a note per ZipMap.
pub fn drop_zipmaps(model: &mut ModelProto) -> Vec<String> {
    let Some(graph) = model.graph.as_mut() else {
        return vec![];
    };
    let mut notes = vec![];
    for node in graph.node.iter_mut().filter(|n| n.op_type == "ZipMap") {
        let Some(out) = node.output.first().cloned() else {
            continue;
        };
        notes.push(format!(
            "ZipMap {:?} dropped: output {out:?} is the probabilities tensor, one column per class label in the order the model lists them",
            node.name
        ));
        node.op_type = "Identity".into();
        node.domain.clear();
        node.attribute.clear();
        for o in graph.output.iter_mut().filter(|o| o.name == out) {
            o.r#type = Some(tract_onnx::pb::TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: None,
                })),
                ..Default::default()
            });
        }
    }
    notes
}

/// A small constant: its values (as f64; ints up to 2^53 are exact) and
/// shape, enough to decide conditions.
#[derive(Clone, Debug)]
struct Small {
    values: Vec<f64>,
}

fn small_of(t: &TensorProto) -> Option<Small> {
    if t.dims.iter().product::<i64>() > 64 {
        return None;
    }
    let resolver = tract_onnx::data_resolver::default();
    let tensor = tract_onnx::tensor::load_tensor(&*resolver, t, None).ok()?;
    let tensor = tensor.cast_to::<f64>().ok()?.into_owned();
    let values = tensor
        .try_as_plain_ram()
        .ok()?
        .as_slice::<f64>()
        .ok()?
        .to_vec();
    Some(Small { values })
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Evaluates the nodes a condition is usually made of, when every input is
/// known. Broadcasting is only scalar against tensor.
fn eval(node: &NodeProto, known: &HashMap<String, Small>) -> Option<Small> {
    let arg = |i: usize| node.input.get(i).and_then(|n| known.get(n));
    let zip = |f: &dyn Fn(f64, f64) -> f64| -> Option<Small> {
        let (a, b) = (arg(0)?, arg(1)?);
        let n = a.values.len().max(b.values.len());
        if !(a.values.len() == n || a.values.len() == 1)
            || !(b.values.len() == n || b.values.len() == 1)
        {
            return None;
        }
        let at = |v: &Small, i: usize| v.values[if v.values.len() == 1 { 0 } else { i }];
        Some(Small {
            values: (0..n).map(|i| f(at(a, i), at(b, i))).collect(),
        })
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    match node.op_type.as_str() {
        "Constant" => attr(node, "value")
            .and_then(|a| a.t.as_ref())
            .and_then(small_of),
        "Identity" | "Cast" | "Squeeze" | "Unsqueeze" | "Reshape" | "Flatten" => {
            let v = arg(0)?.clone();
            match (node.op_type.as_str(), attr(node, "to").map(|a| a.i)) {
                ("Cast", Some(to)) if to == DataType::Bool as i64 => Some(Small {
                    values: v.values.iter().map(|x| b(*x != 0.0)).collect(),
                }),
                ("Cast", Some(to))
                    if to != DataType::Float as i64 && to != DataType::Double as i64 =>
                {
                    Some(Small {
                        values: v.values.iter().map(|x| x.trunc()).collect(),
                    })
                }
                _ => Some(v),
            }
        }
        "Equal" => zip(&|x, y| b(x == y)),
        "Greater" => zip(&|x, y| b(x > y)),
        "Less" => zip(&|x, y| b(x < y)),
        "GreaterOrEqual" => zip(&|x, y| b(x >= y)),
        "LessOrEqual" => zip(&|x, y| b(x <= y)),
        "And" => zip(&|x, y| b(x != 0.0 && y != 0.0)),
        "Or" => zip(&|x, y| b(x != 0.0 || y != 0.0)),
        "Xor" => zip(&|x, y| b((x != 0.0) != (y != 0.0))),
        "Not" => Some(Small {
            values: arg(0)?.values.iter().map(|x| b(*x == 0.0)).collect(),
        }),
        _ => None,
    }
}

/// Folds every `If` whose condition is known from initializers (and the
/// small constant nodes computing it) into the branch it takes. Returns a
/// note per fold, and the names of the `If` nodes left (on data).
pub fn fold_ifs(graph: &mut GraphProto) -> (Vec<String>, Vec<String>) {
    fold_ifs_given(graph, &HashMap::new())
}

/// Like [`fold_ifs`], with conditions known from elsewhere (tract's
/// analysis), by tensor name. A branch inlined may hold Ifs of its own:
/// passes repeat while one folds.
pub fn fold_ifs_given(
    graph: &mut GraphProto,
    given: &HashMap<String, f64>,
) -> (Vec<String>, Vec<String>) {
    let mut notes = vec![];
    for _ in 0..16 {
        let (folded, left) = fold_pass(graph, given);
        let done = folded.is_empty();
        notes.extend(folded);
        if done {
            return (notes, left);
        }
    }
    let left = graph
        .node
        .iter()
        .filter(|n| n.op_type == "If")
        .map(|n| format!("{:?}", n.name))
        .collect();
    (notes, left)
}

fn fold_pass(graph: &mut GraphProto, given: &HashMap<String, f64>) -> (Vec<String>, Vec<String>) {
    let mut notes = vec![];
    let mut left = vec![];
    let mut known: HashMap<String, Small> = graph
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.clone(), small_of(t)?)))
        .chain(
            given
                .iter()
                .map(|(k, v)| (k.clone(), Small { values: vec![*v] })),
        )
        .collect();
    let mut names = super::names::Names::of(graph);
    let mut out = Vec::with_capacity(graph.node.len());
    let mut new_inits = vec![];
    for node in std::mem::take(&mut graph.node) {
        if node.op_type != "If" {
            if let (Some(v), [o]) = (eval(&node, &known), node.output.as_slice()) {
                known.insert(o.clone(), v);
            }
            out.push(node);
            continue;
        }
        let cond = node.input.first().and_then(|c| known.get(c));
        let Some(take) = cond.and_then(|c| c.values.first()).map(|v| *v != 0.0) else {
            left.push(format!(
                "{:?}",
                if node.name.is_empty() {
                    node.output.first().cloned().unwrap_or_default()
                } else {
                    node.name.clone()
                }
            ));
            out.push(node);
            continue;
        };
        let branch = if take { "then_branch" } else { "else_branch" };
        let Some(sub) = attr(&node, branch).and_then(|a| a.g.as_ref()) else {
            out.push(node);
            continue;
        };
        if sub.output.len() != node.output.len() {
            out.push(node);
            continue;
        }
        // The branch's own tensors get fresh names; its outputs become the
        // If's outputs; outer names it reads stay as they are.
        let prefix = if node.name.is_empty() {
            node.output[0].clone()
        } else {
            node.name.clone()
        };
        let produced: HashSet<&str> = sub
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let mut rename: HashMap<String, String> = HashMap::new();
        for (o, to) in sub.output.iter().zip(&node.output) {
            if produced.contains(o.name.as_str()) {
                rename.insert(o.name.clone(), to.clone());
            }
        }
        let local = produced
            .iter()
            .copied()
            .chain(sub.initializer.iter().map(|t| t.name.as_str()));
        for name in local {
            if rename.contains_key(name) || name.is_empty() {
                continue;
            }
            let fresh = names.fresh(&format!("{prefix}/{branch}/{name}"));
            rename.insert(name.to_string(), fresh);
        }
        for t in &sub.initializer {
            let mut t = t.clone();
            t.name = rename[&t.name].clone();
            new_inits.push(t);
        }
        for n in &sub.node {
            let mut n = n.clone();
            rename_refs(&mut n, &rename);
            if !n.name.is_empty() {
                n.name = format!("{prefix}/{branch}/{}", n.name);
            }
            out.push(n);
        }
        // A branch output that no branch node makes (an outer tensor or a
        // branch initializer) gets the If's name through an Identity.
        for (o, to) in sub.output.iter().zip(&node.output) {
            if !produced.contains(o.name.as_str()) {
                let from = rename.get(&o.name).cloned().unwrap_or(o.name.clone());
                out.push(NodeProto {
                    name: format!("{to}/identity"),
                    op_type: "Identity".into(),
                    input: vec![from],
                    output: vec![to.clone()],
                    ..Default::default()
                });
            }
        }
        notes.push(format!(
            "If {:?} folded: its condition is constant ({take}) once the inputs are known, the {} is inlined",
            node.name,
            branch.replace('_', " ")
        ));
    }
    graph.node = out;
    graph.initializer.extend(new_inits);
    (notes, left)
}

/// Renames the tensors a node reads and writes, and the references of
/// nested subgraphs to names renamed here (a nested graph's own names
/// shadow them).
fn rename_refs(node: &mut NodeProto, rename: &HashMap<String, String>) {
    for name in node.input.iter_mut().chain(node.output.iter_mut()) {
        if let Some(to) = rename.get(name) {
            *name = to.clone();
        }
    }
    for a in &mut node.attribute {
        for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
            let own: HashSet<String> = g
                .node
                .iter()
                .flat_map(|n| n.output.iter().cloned())
                .chain(g.initializer.iter().map(|t| t.name.clone()))
                .chain(g.input.iter().map(|i| i.name.clone()))
                .collect();
            let outer: HashMap<String, String> = rename
                .iter()
                .filter(|(k, _)| !own.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for n in &mut g.node {
                rename_refs(n, &outer);
            }
            for o in &mut g.output {
                if let Some(to) = outer.get(&o.name) {
                    o.name = to.clone();
                }
            }
        }
    }
}
