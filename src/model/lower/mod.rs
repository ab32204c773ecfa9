//! Lowerings: operators tract lacks, or runs far slower than it could,
//! written out in operators it runs well. Each works on the ONNX graph
//! before tract sees it (ONNX Runtime gets the graph without them) and
//! keeps the operator's definition, so answers do not move:
//!
//! - the `com.microsoft` QOperator ops that onnxruntime's quantizer emits
//!   (QLinearAdd, QLinearMul, QLinearConcat, QLinearSigmoid,
//!   QLinearLeakyRelu, QLinearGlobalAveragePool, QLinearAveragePool,
//!   QLinearSoftmax, QGemm) become DequantizeLinear → the float op →
//!   QuantizeLinear, which is how onnxruntime itself defines them;
//! - QLinearConv and QLinearMatMul (standard ONNX, onnxruntime's QOperator
//!   form) become the same: tract has them, but its integer path ran a
//!   QOperator KWS in 9.0x the instructions of the QDQ form on an emulated
//!   Cortex-A53 (20.4 M against 2.26 M) and 45x onnxruntime's time on
//!   x86-64; as QDQ they reach edgeinfer's FakeQuantize and own kernels;
//! - ConvInteger and MatMulInteger (dynamic quantization) become the float
//!   Conv / MatMul of the zero-point-shifted integers, weights shifted once
//!   at load. The products and sums of 8-bit integers are exact in f32 up to
//!   2^24, so the int32 result is the same; tract's f32 kernels are faster
//!   than its i32 path (2.4x on a MatMul chain, measured in the README).

mod sklearn;

use std::collections::HashMap;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, GraphProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;

/// What [`lower`] did: one note per lowered operator type with its count
/// (for logs and `models --check`), and why a node it knows was left.
#[derive(Debug, Default)]
pub struct Lowered {
    pub notes: Vec<String>,
    pub declined: Vec<String>,
}

/// Lowers every node it knows in `graph`. A node it cannot lower (a missing
/// input, weights it cannot read, a form not written out) stays as it is.
pub fn lower(graph: &mut GraphProto) -> Lowered {
    let mut edit = Edit::new(graph);
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut declined = vec![];
    let mut out = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let mut or_declined = |r: Result<Vec<NodeProto>, String>| match r {
            Ok(nodes) => Some(nodes),
            Err(why) => {
                declined.push(format!(
                    "{} {:?} not written out for tract: {why}",
                    node.op_type, node.name
                ));
                None
            }
        };
        let lowered = match (node.domain.as_str(), node.op_type.as_str()) {
            ("ai.onnx.ml", "Scaler") => edit.ml_scaler(&node),
            ("ai.onnx.ml", "ArrayFeatureExtractor") => edit.ml_feature_extractor(&node),
            ("ai.onnx.ml", "SVMRegressor") => or_declined(edit.ml_svm_regressor(&node)),
            ("ai.onnx.ml", "SVMClassifier") => or_declined(edit.ml_svm_classifier(&node)),
            ("ai.onnx.ml", "TreeEnsembleRegressor") => or_declined(edit.ml_tree_regressor(&node)),
            ("com.microsoft", "QLinearAdd") => edit.qlinear_binary(&node, "Add"),
            ("com.microsoft", "QLinearMul") => edit.qlinear_binary(&node, "Mul"),
            ("com.microsoft", "QLinearSigmoid") => edit.qlinear_unary(&node, "Sigmoid", &[]),
            ("com.microsoft", "QLinearLeakyRelu") => {
                edit.qlinear_unary(&node, "LeakyRelu", &["alpha"])
            }
            ("com.microsoft", "QLinearSoftmax") => edit.qlinear_unary(&node, "Softmax", &["axis"]),
            ("com.microsoft", "QLinearGlobalAveragePool") => edit.qlinear_pool(&node, true),
            ("com.microsoft", "QLinearAveragePool") => edit.qlinear_pool(&node, false),
            ("com.microsoft", "QLinearConcat") => edit.qlinear_concat(&node),
            ("com.microsoft", "QGemm") => edit.qgemm(&node),
            ("" | "ai.onnx", "QLinearConv") => edit.qlinear_conv(&node),
            ("" | "ai.onnx", "QLinearMatMul") => edit.qlinear_matmul(&node),
            ("" | "ai.onnx", "DynamicQuantizeLinear") => edit.dynamic_quantize(&node),
            ("" | "ai.onnx", "ConvInteger") => edit.integer_op(&node, "Conv"),
            ("" | "ai.onnx", "MatMulInteger") => edit.integer_op(&node, "MatMul"),
            _ => None,
        };
        match lowered {
            Some(nodes) => {
                let what = format!("{}{}", node.op_type, edit.note_suffix(&node));
                match counts.iter_mut().find(|(k, _)| *k == what) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((what, 1)),
                }
                out.extend(nodes);
            }
            None => out.push(node),
        }
    }
    graph.node = out;
    graph.initializer.append(&mut edit.new_inits);
    graph
        .node
        .iter_mut()
        .filter(|n| n.op_type == "Cast" && edit.float_casts.contains(&n.input[0]))
        .for_each(|n| {
            // The lowered integer op already produces f32: its Cast to
            // float is a no-op kept for the graph's names.
            n.op_type = "Identity".into();
            n.attribute.clear();
        });
    Lowered {
        notes: counts
            .into_iter()
            .map(|(what, n)| lowering_note(&what, n))
            .collect(),
        declined,
    }
}

fn lowering_note(what: &str, n: usize) -> String {
    let (op, how) = what.split_once('|').unwrap_or((what, ""));
    let times = if n == 1 {
        String::new()
    } else {
        format!(" ×{n}")
    };
    match op {
        "ArrayFeatureExtractor" => format!(
            "ArrayFeatureExtractor{times}: scalar index given as [1] (tract drops the axis onnxruntime keeps)"
        ),
        "Scaler" | "SVMRegressor" | "SVMClassifier" | "TreeEnsembleRegressor" => format!(
            "{op} (ai.onnx.ml){times} written out in standard operators (tract has no {op})"
        ),
        "DynamicQuantizeLinear" => format!(
            "DynamicQuantizeLinear{times} computed in float ops (tract's own is slow)"
        ),
        "ConvInteger" | "MatMulInteger" => format!(
            "{op}{times} run as float {} on the zero-point-shifted integers{how} (same int32 result; tract's integer path is slow)",
            &op[..op.len() - "Integer".len()]
        ),
        "QLinearConv" | "QLinearMatMul" => format!(
            "{op}{times} lowered to DequantizeLinear → float op → QuantizeLinear (tract's integer path measured 9-11x slower on these, x86-64 and aarch64 alike)"
        ),
        _ => format!(
            "{op} (com.microsoft){times} lowered to DequantizeLinear → float op → QuantizeLinear (tract has no {op})"
        ),
    }
}

struct Edit {
    init: HashMap<String, TensorProto>,
    /// Every tensor's consumers, by op type, before the edit.
    consumers: HashMap<String, Vec<(String, i64)>>,
    names: crate::model::names::Names,
    new_inits: Vec<TensorProto>,
    /// Outputs of lowered integer ops whose Cast-to-float consumers become
    /// Identity.
    float_casts: std::collections::HashSet<String>,
    /// Per lowered DynamicQuantizeLinear, by its quantized output: its zero
    /// point output and the float tensor holding `q − zero_point`.
    dynamic: HashMap<String, (String, String)>,
    /// Tensors known to be f32 (float graph inputs, lowered outputs).
    known_float: std::collections::HashSet<String>,
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn input(node: &NodeProto, ix: usize) -> Option<&str> {
    node.input
        .get(ix)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

impl Edit {
    fn new(graph: &GraphProto) -> Edit {
        let mut consumers: HashMap<String, Vec<(String, i64)>> = HashMap::new();
        for n in &graph.node {
            let to = attr(n, "to").map(|a| a.i).unwrap_or(-1);
            for i in &n.input {
                consumers
                    .entry(i.clone())
                    .or_default()
                    .push((n.op_type.clone(), to));
            }
        }
        let names = crate::model::names::Names::of(graph);
        Edit {
            init: graph
                .initializer
                .iter()
                .map(|t| (t.name.clone(), t.clone()))
                .collect(),
            consumers,
            names,
            new_inits: vec![],
            float_casts: Default::default(),
            dynamic: HashMap::new(),
            known_float: graph
                .input
                .iter()
                .filter(|i| {
                    matches!(
                        i.r#type.as_ref().and_then(|t| t.value.as_ref()),
                        Some(tract_onnx::pb::type_proto::Value::TensorType(t))
                            if t.elem_type == DataType::Float as i32
                    )
                })
                .map(|i| i.name.clone())
                .collect(),
        }
    }

    fn note_suffix(&self, node: &NodeProto) -> &'static str {
        match node.op_type.as_str() {
            "ConvInteger" | "MatMulInteger"
                if input(node, 1).is_some_and(|w| self.init.contains_key(w)) =>
            {
                "|, weights shifted at load"
            }
            _ => "",
        }
    }

    fn fresh(&mut self, base: &str, what: &str) -> String {
        self.names.fresh(&format!("{base}/edgeinfer_{what}"))
    }

    fn base(node: &NodeProto) -> String {
        if node.name.is_empty() {
            node.output.first().cloned().unwrap_or_default()
        } else {
            node.name.clone()
        }
    }

    fn node(&mut self, base: &str, op: &str, inputs: Vec<String>, output: String) -> NodeProto {
        NodeProto {
            name: self.fresh(base, &op.to_lowercase()),
            op_type: op.into(),
            input: inputs,
            output: vec![output],
            ..Default::default()
        }
    }

    /// The element type of a zero point: from its initializer, else uint8
    /// (the type QuantizeLinear assumes without one).
    fn zero_point_type(&self, zp: Option<&str>) -> i32 {
        zp.and_then(|z| self.init.get(z))
            .map(|t| t.data_type)
            .unwrap_or(DataType::Uint8 as i32)
    }

    /// A zero point for QuantizeLinear: the given one, or a scalar zero of
    /// `dt` (so the output keeps the operator's element type).
    fn zero_point_or_zero(&mut self, base: &str, zp: Option<&str>, dt: i32) -> String {
        if let Some(z) = zp {
            return z.to_string();
        }
        let name = self.fresh(base, "zero_point");
        let zero = TensorProto {
            name: name.clone(),
            data_type: dt,
            int32_data: vec![0],
            ..Default::default()
        };
        self.new_inits.push(zero);
        name
    }

    /// `DequantizeLinear(x, scale, zp)` into a fresh float tensor.
    fn dequantize(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        x: &str,
        scale: &str,
        zp: Option<&str>,
    ) -> String {
        let y = self.fresh(base, "dequantized");
        let mut inputs = vec![x.to_string(), scale.to_string()];
        inputs.extend(zp.map(str::to_string));
        let n = self.node(base, "DequantizeLinear", inputs, y.clone());
        out.push(n);
        y
    }

    fn quantize(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        x: String,
        (scale, zp): (&str, Option<&str>),
        dt: i32,
        y: &str,
    ) {
        let zp = self.zero_point_or_zero(base, zp, dt);
        let n = self.node(
            base,
            "QuantizeLinear",
            vec![x, scale.to_string(), zp],
            y.to_string(),
        );
        out.push(n);
    }

    /// QLinearAdd / QLinearMul: A, A_scale, A_zp, B, B_scale, B_zp,
    /// C_scale, C_zp.
    fn qlinear_binary(&mut self, node: &NodeProto, op: &str) -> Option<Vec<NodeProto>> {
        let (a, a_s, b, b_s, c_s) = (
            input(node, 0)?,
            input(node, 1)?,
            input(node, 3)?,
            input(node, 4)?,
            input(node, 6)?,
        );
        let y = node.output.first()?;
        let base = Self::base(node);
        let dt = self.zero_point_type(input(node, 2));
        let mut out = vec![];
        let af = self.dequantize(&mut out, &base, a, a_s, input(node, 2));
        let bf = self.dequantize(&mut out, &base, b, b_s, input(node, 5));
        let cf = self.fresh(&base, "float");
        let n = self.node(&base, op, vec![af, bf], cf.clone());
        out.push(n);
        self.quantize(&mut out, &base, cf, (c_s, input(node, 7)), dt, y);
        Some(out)
    }

    /// QLinearSigmoid / QLinearLeakyRelu / QLinearSoftmax: X, X_scale,
    /// X_zp, Y_scale, Y_zp; `keep` lists the attributes the float op takes.
    fn qlinear_unary(
        &mut self,
        node: &NodeProto,
        op: &str,
        keep: &[&str],
    ) -> Option<Vec<NodeProto>> {
        let (x, x_s, y_s) = (input(node, 0)?, input(node, 1)?, input(node, 3)?);
        let y = node.output.first()?;
        let base = Self::base(node);
        let dt = self.zero_point_type(input(node, 2));
        let mut out = vec![];
        let xf = self.dequantize(&mut out, &base, x, x_s, input(node, 2));
        let yf = self.fresh(&base, "float");
        let mut n = self.node(&base, op, vec![xf], yf.clone());
        n.attribute = node
            .attribute
            .iter()
            .filter(|a| keep.contains(&a.name.as_str()))
            .cloned()
            .collect();
        out.push(n);
        self.quantize(&mut out, &base, yf, (y_s, input(node, 4)), dt, y);
        Some(out)
    }

    /// QLinearGlobalAveragePool / QLinearAveragePool: X, x_scale, x_zp,
    /// y_scale, y_zp. The channels-last form is refused (left as it is).
    fn qlinear_pool(&mut self, node: &NodeProto, global: bool) -> Option<Vec<NodeProto>> {
        if attr(node, "channels_last").is_some_and(|a| a.i != 0) {
            return None;
        }
        let op = if global {
            "GlobalAveragePool"
        } else {
            "AveragePool"
        };
        let keep: &[&str] = &[
            "auto_pad",
            "ceil_mode",
            "count_include_pad",
            "kernel_shape",
            "pads",
            "strides",
        ];
        self.qlinear_unary(node, op, if global { &[] } else { keep })
    }

    /// QLinearConcat: Y_scale, Y_zp, then (X, X_scale, X_zp) per input.
    fn qlinear_concat(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let y_s = input(node, 0)?;
        let y = node.output.first()?;
        if node.input.len() < 5 || !(node.input.len() - 2).is_multiple_of(3) {
            return None;
        }
        let base = Self::base(node);
        let dt = self.zero_point_type(input(node, 1).or(input(node, 4)));
        let mut out = vec![];
        let mut parts = vec![];
        for k in 0..(node.input.len() - 2) / 3 {
            let at = 2 + 3 * k;
            let (x, s) = (input(node, at)?, input(node, at + 1)?);
            parts.push(self.dequantize(&mut out, &base, x, s, input(node, at + 2)));
        }
        let yf = self.fresh(&base, "float");
        let mut n = self.node(&base, "Concat", parts, yf.clone());
        n.attribute = node
            .attribute
            .iter()
            .filter(|a| a.name == "axis")
            .cloned()
            .collect();
        out.push(n);
        self.quantize(&mut out, &base, yf, (y_s, input(node, 1)), dt, y);
        Some(out)
    }

    /// QGemm: A, a_scale, a_zp, B, b_scale, b_zp, C (int32 bias in
    /// a_scale·b_scale units), y_scale, y_zp; without y_scale the output is
    /// float.
    fn qgemm(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let (a, a_s, b, b_s) = (
            input(node, 0)?,
            input(node, 1)?,
            input(node, 3)?,
            input(node, 4)?,
        );
        let y = node.output.first()?;
        let base = Self::base(node);
        let dt = self.zero_point_type(input(node, 2));
        let mut out = vec![];
        let af = self.dequantize(&mut out, &base, a, a_s, input(node, 2));
        // Per-column weight scales run along B's output axis (N): 0 when B
        // is transposed ([N, K]), 1 otherwise.
        let trans_b = attr(node, "transB").is_some_and(|t| t.i != 0);
        let bf = self.fresh(&base, "dequantized");
        let mut inputs = vec![b.to_string(), b_s.to_string()];
        inputs.extend(input(node, 5).map(str::to_string));
        let mut dq = self.node(&base, "DequantizeLinear", inputs, bf.clone());
        dq.attribute.push(AttributeProto {
            name: "axis".into(),
            r#type: AttributeType::Int as i32,
            i: if trans_b { 0 } else { 1 },
            ..Default::default()
        });
        out.push(dq);
        let mut gemm_inputs = vec![af, bf];
        if let Some(c) = input(node, 6) {
            // The bias dequantizes with scale a_scale·b_scale (per column
            // when B's scale is).
            gemm_inputs.push(self.scaled_bias(&mut out, &base, c, a_s, b_s));
        }
        let float_out = match input(node, 7) {
            Some(_) => self.fresh(&base, "float"),
            None => y.clone(),
        };
        let mut n = self.node(&base, "Gemm", gemm_inputs, float_out.clone());
        n.attribute = node
            .attribute
            .iter()
            .filter(|a| ["alpha", "transA", "transB"].contains(&a.name.as_str()))
            .cloned()
            .collect();
        out.push(n);
        if let Some(y_s) = input(node, 7) {
            self.quantize(&mut out, &base, float_out, (y_s, input(node, 8)), dt, y);
        }
        Some(out)
    }

    /// QLinearConv: x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp and
    /// an optional int32 bias in x_scale·w_scale units; as onnxruntime
    /// defines it: the float Conv of the dequantized input and weights (per
    /// output channel: axis 0) plus the dequantized bias, quantized again.
    /// The weights are constants: tract folds their dequantization at load.
    fn qlinear_conv(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let (x, x_s, w, w_s, y_s) = (
            input(node, 0)?,
            input(node, 1)?,
            input(node, 3)?,
            input(node, 4)?,
            input(node, 6)?,
        );
        let y = node.output.first()?;
        let base = Self::base(node);
        let dt = self.zero_point_type(input(node, 7));
        let mut out = vec![];
        let xf = self.dequantize(&mut out, &base, x, x_s, input(node, 2));
        let wf = self.dequantize_along(&mut out, &base, w, w_s, input(node, 5), 0);
        let mut conv_inputs = vec![xf, wf];
        if let Some(b) = input(node, 8) {
            conv_inputs.push(self.scaled_bias(&mut out, &base, b, x_s, w_s));
        }
        let yf = self.fresh(&base, "float");
        let mut n = self.node(&base, "Conv", conv_inputs, yf.clone());
        n.attribute = node
            .attribute
            .iter()
            .filter(|a| {
                [
                    "auto_pad",
                    "dilations",
                    "group",
                    "kernel_shape",
                    "pads",
                    "strides",
                ]
                .contains(&a.name.as_str())
            })
            .cloned()
            .collect();
        out.push(n);
        self.quantize(&mut out, &base, yf, (y_s, input(node, 7)), dt, y);
        Some(out)
    }

    /// QLinearMatMul: a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp;
    /// b's scale per column (axis 1) where it is a vector.
    fn qlinear_matmul(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let (a, a_s, b, b_s, y_s) = (
            input(node, 0)?,
            input(node, 1)?,
            input(node, 3)?,
            input(node, 4)?,
            input(node, 6)?,
        );
        let y = node.output.first()?;
        let base = Self::base(node);
        let dt = self.zero_point_type(input(node, 7));
        let mut out = vec![];
        let af = self.dequantize(&mut out, &base, a, a_s, input(node, 2));
        let bf = self.dequantize_along(&mut out, &base, b, b_s, input(node, 5), 1);
        let yf = self.fresh(&base, "float");
        let n = self.node(&base, "MatMul", vec![af, bf], yf.clone());
        out.push(n);
        self.quantize(&mut out, &base, yf, (y_s, input(node, 7)), dt, y);
        Some(out)
    }

    /// `DequantizeLinear(x, scale, zp)` with its `axis` (for per-channel
    /// scales) into a fresh float tensor.
    fn dequantize_along(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        x: &str,
        scale: &str,
        zp: Option<&str>,
        axis: i64,
    ) -> String {
        let y = self.dequantize(out, base, x, scale, zp);
        if let Some(n) = out.last_mut() {
            n.attribute.push(int_attr("axis", axis));
        }
        y
    }

    /// An int32 bias in a_scale·b_scale units, as floats.
    fn scaled_bias(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        bias: &str,
        a_s: &str,
        b_s: &str,
    ) -> String {
        let scale = self.fresh(base, "bias_scale");
        let n = self.node(
            base,
            "Mul",
            vec![a_s.to_string(), b_s.to_string()],
            scale.clone(),
        );
        out.push(n);
        let cast = self.fresh(base, "bias_f32");
        let mut n = self.node(base, "Cast", vec![bias.to_string()], cast.clone());
        n.attribute.push(int_attr("to", DataType::Float as i64));
        out.push(n);
        let cf = self.fresh(base, "bias");
        let n = self.node(base, "Mul", vec![cast, scale], cf.clone());
        out.push(n);
        cf
    }

    /// ConvInteger / MatMulInteger: (x, w, x_zp, w_zp) → int32, as the
    /// float op on Cast(x) − x_zp and w − w_zp.
    fn integer_op(&mut self, node: &NodeProto, op: &str) -> Option<Vec<NodeProto>> {
        let (x, w) = (input(node, 0)?, input(node, 1)?);
        let y = node.output.first()?.clone();
        let base = Self::base(node);
        let mut out = vec![];
        let xf = match self.dynamic.get(x) {
            // Quantized by a lowered DynamicQuantizeLinear and shifted by its
            // own zero point: its float `q − zero_point` serves as it is.
            Some((zp, shifted)) if input(node, 2) == Some(zp.as_str()) => shifted.clone(),
            _ => self.shifted(&mut out, &base, x, input(node, 2), None)?,
        };
        let w_axis = if op == "Conv" { Some(0) } else { None };
        let wf = match self.shifted_weights(&base, w, input(node, 3), w_axis) {
            Some(wf) => wf,
            None => self.shifted(&mut out, &base, w, input(node, 3), w_axis)?,
        };
        // Consumers that only cast the int32 result to float can take the
        // float result as it is; anything else gets an int32 again.
        let only_float_casts = self.consumers.get(&y).is_some_and(|c| {
            !c.is_empty()
                && c.iter()
                    .all(|(op, to)| op == "Cast" && *to == DataType::Float as i64)
        });
        let float_out = if only_float_casts {
            self.float_casts.insert(y.clone());
            y.clone()
        } else {
            self.fresh(&base, "float")
        };
        let mut n = self.node(&base, op, vec![xf, wf], float_out.clone());
        if op == "Conv" {
            n.attribute = node.attribute.clone();
        }
        out.push(n);
        if !only_float_casts {
            let rounded = self.fresh(&base, "rounded");
            let n = self.node(&base, "Round", vec![float_out], rounded.clone());
            out.push(n);
            let mut n = self.node(&base, "Cast", vec![rounded], y);
            n.attribute.push(int_attr("to", DataType::Int32 as i64));
            out.push(n);
        }
        Some(out)
    }

    /// DynamicQuantizeLinear (uint8) in float ops, by its definition:
    /// scale = (max(x, 0) − min(x, 0)) / 255, zero point =
    /// clip(round(−min / scale), 0, 255), q = clip(round(x / scale) + zp,
    /// 0, 255). tract's own DynamicQuantizeLinear is slow (about four
    /// element-wise passes' time per pass over the input, measured). The
    /// quantized values are also kept as float `q − zp` =
    /// clip(round(x / scale), −zp, 255 − zp) for the integer ops lowered
    /// after it; the uint8 outputs stay for any other consumer (tract prunes
    /// them when there is none).
    fn dynamic_quantize(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let x = input(node, 0)?;
        let [q, scale, zp] = [0, 1, 2].map(|i| node.output.get(i).cloned().unwrap_or_default());
        if q.is_empty() || scale.is_empty() || zp.is_empty() {
            return None;
        }
        let base = Self::base(node);
        let mut out = vec![];
        let zero = self.float_init(&base, "zero", tensor0(0f32));
        let full = self.float_init(&base, "levels", tensor0(255f32));
        let tiny = self.float_init(&base, "tiny", tensor0(f32::MIN_POSITIVE));
        let mut reduce = |edit: &mut Edit, op: &str, bound: &str| {
            let r = edit.fresh(&base, &op.to_lowercase());
            let mut n = edit.node(&base, op, vec![x.to_string()], r.clone());
            n.attribute.push(int_attr("keepdims", 0));
            out.push(n);
            let b = edit.fresh(&base, "bounded");
            let minmax = if op == "ReduceMin" { "Min" } else { "Max" };
            out.push(edit.node(&base, minmax, vec![r, bound.to_string()], b.clone()));
            b
        };
        let lo = reduce(self, "ReduceMin", &zero);
        let hi = reduce(self, "ReduceMax", &zero);
        let span = self.fresh(&base, "span");
        out.push(self.node(&base, "Sub", vec![hi, lo.clone()], span.clone()));
        out.push(self.node(&base, "Div", vec![span, full.clone()], scale.clone()));
        // Divisions use a scale that is never zero (an all-zero input).
        let divisor = self.fresh(&base, "divisor");
        out.push(self.node(&base, "Max", vec![scale.clone(), tiny], divisor.clone()));
        let neg = self.fresh(&base, "neg_min");
        out.push(self.node(&base, "Neg", vec![lo], neg.clone()));
        let zp_raw = self.fresh(&base, "zero_point_raw");
        out.push(self.node(&base, "Div", vec![neg, divisor.clone()], zp_raw.clone()));
        let zp_round = self.fresh(&base, "zero_point_rounded");
        out.push(self.node(&base, "Round", vec![zp_raw], zp_round.clone()));
        let zp_f = self.fresh(&base, "zero_point_f32");
        let zp_lo = self.fresh(&base, "zero_point_low");
        out.push(self.node(&base, "Max", vec![zp_round, zero.clone()], zp_lo.clone()));
        out.push(self.node(&base, "Min", vec![zp_lo, full.clone()], zp_f.clone()));
        let ratio = self.fresh(&base, "ratio");
        out.push(self.node(&base, "Div", vec![x.to_string(), divisor], ratio.clone()));
        let rounded = self.fresh(&base, "rounded");
        out.push(self.node(&base, "Round", vec![ratio], rounded.clone()));
        // q − zp = clip(round(x / scale), −zp, 255 − zp)
        let lower = self.fresh(&base, "lower");
        out.push(self.node(&base, "Neg", vec![zp_f.clone()], lower.clone()));
        let upper = self.fresh(&base, "upper");
        out.push(self.node(&base, "Sub", vec![full, zp_f.clone()], upper.clone()));
        let above = self.fresh(&base, "above");
        out.push(self.node(&base, "Max", vec![rounded, lower], above.clone()));
        let shifted = self.fresh(&base, "shifted");
        out.push(self.node(&base, "Min", vec![above, upper], shifted.clone()));
        // The uint8 outputs, for other consumers.
        let q_f = self.fresh(&base, "q_f32");
        out.push(self.node(
            &base,
            "Add",
            vec![shifted.clone(), zp_f.clone()],
            q_f.clone(),
        ));
        for (from, to) in [(q_f, q.clone()), (zp_f, zp.clone())] {
            let mut n = self.node(&base, "Cast", vec![from], to);
            n.attribute.push(int_attr("to", DataType::Uint8 as i64));
            out.push(n);
        }
        self.dynamic.insert(q, (zp, shifted));
        Some(out)
    }

    /// `Cast(x, float) − Cast(zp, float)` at run time. A per-channel zero
    /// point of a Conv weight (`axis` 0) is reshaped to broadcast.
    fn shifted(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        x: &str,
        zp: Option<&str>,
        axis: Option<usize>,
    ) -> Option<String> {
        let xf = self.fresh(base, "f32");
        let mut n = self.node(base, "Cast", vec![x.to_string()], xf.clone());
        n.attribute.push(int_attr("to", DataType::Float as i64));
        out.push(n);
        let Some(zp) = zp else { return Some(xf) };
        let zf = match self.init.get(zp) {
            Some(t) => {
                let mut v = proto_to_f32(t)?;
                if axis == Some(0) && v.rank() == 1 && v.len() > 1 {
                    let n = v.len();
                    v = v.into_shape(&[n, 1, 1, 1]).ok()?;
                }
                self.float_init(base, "zero_point_f32", v)
            }
            None if axis.is_none() => {
                let zf = self.fresh(base, "zero_point_f32");
                let mut n = self.node(base, "Cast", vec![zp.to_string()], zf.clone());
                n.attribute.push(int_attr("to", DataType::Float as i64));
                out.push(n);
                zf
            }
            None => return None,
        };
        let shifted = self.fresh(base, "shifted");
        let n = self.node(base, "Sub", vec![xf, zf], shifted.clone());
        out.push(n);
        Some(shifted)
    }

    /// Constant weights minus their zero point, as an f32 initializer.
    fn shifted_weights(
        &mut self,
        base: &str,
        w: &str,
        zp: Option<&str>,
        axis: Option<usize>,
    ) -> Option<String> {
        let wt = proto_to_f32(self.init.get(w)?)?;
        let shifted = match zp {
            None => wt,
            Some(z) => {
                let z = proto_to_f32(self.init.get(z)?)?;
                let mut z = z.into_plain_array::<f32>().ok()?;
                if let (Some(0), 1) = (axis, z.ndim()) {
                    let n = z.len();
                    z = z.into_shape_with_order(vec![n, 1, 1, 1]).ok()?;
                }
                let w = wt.into_plain_array::<f32>().ok()?;
                let b = z.broadcast(w.shape())?.to_owned();
                (w - b).into_tensor()
            }
        };
        Some(self.float_init(base, "weights_f32", shifted))
    }

    fn int_init(&mut self, base: &str, what: &str, dims: Vec<i64>, values: Vec<i64>) -> String {
        let name = self.fresh(base, what);
        self.new_inits.push(TensorProto {
            name: name.clone(),
            data_type: DataType::Int64 as i32,
            dims,
            int64_data: values,
            ..Default::default()
        });
        name
    }

    fn float_init(&mut self, base: &str, what: &str, t: Tensor) -> String {
        let name = self.fresh(base, what);
        let values = t
            .try_as_plain_ram()
            .ok()
            .and_then(|p| p.as_slice::<f32>().ok().map(<[f32]>::to_vec))
            .unwrap_or_default();
        self.new_inits.push(TensorProto {
            name: name.clone(),
            data_type: DataType::Float as i32,
            dims: t.shape().iter().map(|d| *d as i64).collect(),
            float_data: values,
            ..Default::default()
        });
        name
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn proto_to_f32(t: &TensorProto) -> Option<Tensor> {
    let resolver = tract_onnx::data_resolver::default();
    let tensor = tract_onnx::tensor::load_tensor(&*resolver, t, None).ok()?;
    Some(tensor.cast_to::<f32>().ok()?.into_owned())
}
