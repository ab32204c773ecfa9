//! scikit-learn's `ai.onnx.ml` operators that tract 0.23.9 lacks, written
//! out in standard ONNX operators (tract has LinearClassifier,
//! LinearRegressor, Normalizer, TreeEnsembleClassifier and CategoryMapper
//! itself). Each follows the operator's definition as onnxruntime and the
//! ONNX reference implement it; what is not lowered says why, and ONNX
//! Runtime serves it under `backend = "auto"`.
//!
//! - Scaler: `(x − offset) · scale`.
//! - SVMRegressor and SVMClassifier with support vectors (the SVC/SVR
//!   form skl2onnx writes), linear, polynomial, RBF and sigmoid kernels:
//!   the kernel matrix against the support vectors, then one matrix product
//!   with the pairwise (one-against-one) coefficients; the classifier's
//!   label is the class with most votes. Not lowered: probabilities (Platt
//!   scaling and libsvm's iterative pairwise coupling), string labels,
//!   post transforms, the linear (coefficients-only) form.
//! - TreeEnsembleRegressor: as tract's TreeEnsembleClassifier over one
//!   pseudo-class per target (sum or average of the leaf weights, plus the
//!   base values). Not lowered: MIN/MAX aggregation, post transforms.

use super::{attr, input, int_attr, Edit};
use tract_onnx::pb::{tensor_proto::DataType, NodeProto};
use tract_onnx::prelude::*;

fn floats(node: &NodeProto, name: &str) -> Vec<f32> {
    attr(node, name)
        .map(|a| a.floats.clone())
        .unwrap_or_default()
}

fn ints(node: &NodeProto, name: &str) -> Vec<i64> {
    attr(node, name).map(|a| a.ints.clone()).unwrap_or_default()
}

fn string(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

fn matrix(rows: usize, cols: usize, values: Vec<f32>) -> Option<Tensor> {
    Tensor::from_shape(&[rows, cols], &values).ok()
}

/// The kernel's parameters: gamma, coef0, degree (libsvm's order).
struct Kernel {
    kind: String,
    gamma: f32,
    coef0: f32,
    degree: f32,
}

impl Kernel {
    fn of(node: &NodeProto) -> Kernel {
        let p = floats(node, "kernel_params");
        Kernel {
            kind: string(node, "kernel_type").unwrap_or_else(|| "LINEAR".into()),
            gamma: p.first().copied().unwrap_or(0.0),
            coef0: p.get(1).copied().unwrap_or(0.0),
            degree: p.get(2).copied().unwrap_or(0.0),
        }
    }
}

impl Edit {
    /// `Cast(x, float)`: the ml operators take float, double and integer
    /// features alike.
    fn as_float(&mut self, out: &mut Vec<NodeProto>, base: &str, x: &str) -> String {
        if self.known_float.contains(x) {
            return x.to_string();
        }
        let xf = self.fresh(base, "features");
        let mut n = self.node(base, "Cast", vec![x.to_string()], xf.clone());
        n.attribute.push(int_attr("to", DataType::Float as i64));
        out.push(n);
        xf
    }

    fn op(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        op: &str,
        inputs: Vec<String>,
    ) -> String {
        let y = self.fresh(base, &op.to_lowercase());
        out.push(self.node(base, op, inputs, y.clone()));
        y
    }

    pub(super) fn ml_scaler(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let x = input(node, 0)?;
        let y = node.output.first()?.clone();
        let base = Self::base(node);
        let (offset, scale) = (floats(node, "offset"), floats(node, "scale"));
        let mut out = vec![];
        let mut t = self.as_float(&mut out, &base, x);
        if !offset.is_empty() {
            let n = offset.len();
            let o = self.float_init(&base, "offset", Tensor::from_shape(&[n], &offset).ok()?);
            t = self.op(&mut out, &base, "Sub", vec![t, o]);
        }
        let scale = if scale.is_empty() { vec![1.0] } else { scale };
        let s = self.float_init(
            &base,
            "scale",
            Tensor::from_shape(&[scale.len()], &scale).ok()?,
        );
        self.known_float.insert(y.clone());
        out.push(self.node(&base, "Mul", vec![t, s], y));
        Some(out)
    }

    /// ArrayFeatureExtractor with a scalar index: onnxruntime keeps the
    /// last axis (`[N, 1]`), tract 0.23.9 drops it (`[N]`), and the Concat
    /// skl2onnx writes after it then fails; the index is given as `[1]`.
    pub(super) fn ml_feature_extractor(&mut self, node: &NodeProto) -> Option<Vec<NodeProto>> {
        let indices = self.init.get(input(node, 1)?)?;
        if !indices.dims.is_empty() {
            return None;
        }
        let mut one_d = indices.clone();
        one_d.dims = vec![1];
        one_d.name = self.fresh(&Self::base(node), "indices");
        let mut n = node.clone();
        n.input[1] = one_d.name.clone();
        self.new_inits.push(one_d);
        Some(vec![n])
    }

    /// K[n, s] = kernel(x_n, sv_s) for `sv` (`count` × `features`).
    fn svm_kernel(
        &mut self,
        out: &mut Vec<NodeProto>,
        base: &str,
        x: String,
        sv: &[f32],
        count: usize,
        kernel: &Kernel,
    ) -> Option<String> {
        if count == 0 || !sv.len().is_multiple_of(count) {
            return None;
        }
        let features = sv.len() / count;
        let mut transposed = vec![0f32; sv.len()];
        for s in 0..count {
            for f in 0..features {
                transposed[f * count + s] = sv[s * features + f];
            }
        }
        let svt = self.float_init(
            base,
            "support_vectors",
            matrix(features, count, transposed)?,
        );
        let dot = self.op(out, base, "MatMul", vec![x.clone(), svt]);
        let affine = |edit: &mut Edit, out: &mut Vec<NodeProto>| -> String {
            let g = edit.float_init(base, "gamma", tensor0(kernel.gamma));
            let c = edit.float_init(base, "coef0", tensor0(kernel.coef0));
            let scaled = edit.op(out, base, "Mul", vec![dot.clone(), g]);
            edit.op(out, base, "Add", vec![scaled, c])
        };
        Some(match kernel.kind.as_str() {
            "LINEAR" => dot,
            "SIGMOID" => {
                let a = affine(self, out);
                self.op(out, base, "Tanh", vec![a])
            }
            "POLY" => {
                let a = affine(self, out);
                // Integer degrees by repeated products: a float Pow of a
                // negative base is NaN where std::pow is not.
                let d = kernel.degree;
                if d.fract() == 0.0 && (1.0..=8.0).contains(&d) {
                    let mut p = a.clone();
                    for _ in 1..d as usize {
                        p = self.op(out, base, "Mul", vec![p, a.clone()]);
                    }
                    p
                } else {
                    let e = self.float_init(base, "degree", tensor0(d));
                    self.op(out, base, "Pow", vec![a, e])
                }
            }
            "RBF" => {
                // |x − sv|² = |x|² − 2 x·sv + |sv|², in any opset.
                let sq = self.op(out, base, "Mul", vec![x.clone(), x]);
                let ones = self.float_init(base, "ones", matrix(features, 1, vec![1.0; features])?);
                let xx = self.op(out, base, "MatMul", vec![sq, ones]);
                let norms: Vec<f32> = sv
                    .chunks_exact(features)
                    .map(|v| v.iter().map(|a| a * a).sum())
                    .collect();
                let svsq = self.float_init(base, "sv_norms", matrix(1, count, norms)?);
                let two = self.float_init(base, "two", tensor0(2f32));
                let twice = self.op(out, base, "Mul", vec![dot, two]);
                let d = self.op(out, base, "Sub", vec![xx, twice]);
                let d = self.op(out, base, "Add", vec![d, svsq]);
                let zero = self.float_init(base, "zero", tensor0(0f32));
                let d = self.op(out, base, "Max", vec![d, zero]);
                let g = self.float_init(base, "minus_gamma", tensor0(-kernel.gamma));
                let e = self.op(out, base, "Mul", vec![d, g]);
                self.op(out, base, "Exp", vec![e])
            }
            _ => return None,
        })
    }

    pub(super) fn ml_svm_regressor(&mut self, node: &NodeProto) -> Result<Vec<NodeProto>, String> {
        let x = input(node, 0).ok_or("no input")?;
        let y = node.output.first().ok_or("no output")?.clone();
        if string(node, "post_transform").is_some_and(|p| p != "NONE") {
            return Err("post_transform other than NONE".into());
        }
        let base = Self::base(node);
        let coefs = floats(node, "coefficients");
        let rho = floats(node, "rho").first().copied().unwrap_or(0.0);
        let count = attr(node, "n_supports").map(|a| a.i as usize).unwrap_or(0);
        let mut out = vec![];
        let xf = self.as_float(&mut out, &base, x);
        let k = if count == 0 {
            xf
        } else {
            let sv = floats(node, "support_vectors");
            self.svm_kernel(&mut out, &base, xf, &sv, count, &Kernel::of(node))
                .ok_or("a kernel or support vectors it cannot read")?
        };
        let c = self.float_init(
            &base,
            "coefficients",
            matrix(coefs.len(), 1, coefs).ok_or("bad coefficients")?,
        );
        let dot = self.op(&mut out, &base, "MatMul", vec![k, c]);
        let r = self.float_init(&base, "rho", tensor0(rho));
        if attr(node, "one_class").is_some_and(|a| a.i != 0) {
            let score = self.op(&mut out, &base, "Add", vec![dot, r]);
            let zero = self.float_init(&base, "zero", tensor0(0f32));
            let positive = self.op(&mut out, &base, "Greater", vec![score, zero]);
            let (one, minus) = (
                self.float_init(&base, "one", tensor0(1f32)),
                self.float_init(&base, "minus_one", tensor0(-1f32)),
            );
            out.push(self.node(&base, "Where", vec![positive, one, minus], y));
        } else {
            out.push(self.node(&base, "Add", vec![dot, r], y));
        }
        Ok(out)
    }

    pub(super) fn ml_svm_classifier(&mut self, node: &NodeProto) -> Result<Vec<NodeProto>, String> {
        let x = input(node, 0).ok_or("no input")?;
        let (label_out, scores_out) = match node.output.as_slice() {
            [l, z] => (l.clone(), z.clone()),
            [l] => (l.clone(), String::new()),
            _ => return Err("unexpected outputs".into()),
        };
        if attr(node, "classlabels_strings").is_some_and(|a| !a.strings.is_empty()) {
            return Err("string class labels".into());
        }
        if !floats(node, "prob_a").is_empty() {
            return Err("probabilities (Platt scaling and iterative pairwise coupling)".into());
        }
        if string(node, "post_transform").is_some_and(|p| p != "NONE") {
            return Err("post_transform other than NONE".into());
        }
        let per_class: Vec<usize> = ints(node, "vectors_per_class")
            .iter()
            .map(|v| *v as usize)
            .collect();
        let count: usize = per_class.iter().sum();
        if count == 0 {
            return Err("the linear form without support vectors".into());
        }
        let labels = ints(node, "classlabels_ints");
        let classes = labels.len().max(1);
        if per_class.len() != classes {
            return Err("vectors_per_class does not match the classes".into());
        }
        let coefs = floats(node, "coefficients");
        let rho = floats(node, "rho");
        let pairs = classes * (classes - 1) / 2;
        if coefs.len() != (classes - 1) * count || rho.len() != pairs {
            return Err("coefficients or rho of unexpected length".into());
        }
        let start: Vec<usize> = per_class
            .iter()
            .scan(0, |acc, n| {
                let s = *acc;
                *acc += n;
                Some(s)
            })
            .collect();
        // Pairwise weights W[s, p] and the vote matrices.
        let mut w = vec![0f32; count * pairs];
        let (mut to_i, mut to_j) = (vec![0f32; pairs * classes], vec![0f32; pairs * classes]);
        let mut p = 0;
        for i in 0..classes {
            for j in i + 1..classes {
                for s in start[i]..start[i] + per_class[i] {
                    w[s * pairs + p] = coefs[(j - 1) * count + s];
                }
                for s in start[j]..start[j] + per_class[j] {
                    w[s * pairs + p] = coefs[i * count + s];
                }
                to_i[p * classes + i] = 1.0;
                to_j[p * classes + j] = 1.0;
                p += 1;
            }
        }
        let base = Self::base(node);
        let mut out = vec![];
        let xf = self.as_float(&mut out, &base, x);
        let sv = floats(node, "support_vectors");
        let k = self
            .svm_kernel(&mut out, &base, xf, &sv, count, &Kernel::of(node))
            .ok_or("a kernel or support vectors it cannot read")?;
        let wt = self.float_init(
            &base,
            "pair_weights",
            matrix(count, pairs, w).ok_or("bad weights")?,
        );
        let dot = self.op(&mut out, &base, "MatMul", vec![k, wt]);
        let r = self.float_init(
            &base,
            "rho",
            Tensor::from_shape(&[pairs], &rho).map_err(|e| e.to_string())?,
        );
        let scores = self.op(&mut out, &base, "Add", vec![dot, r]);
        if !scores_out.is_empty() {
            if pairs == 1 {
                // One pair: the scores are written as [−s, s].
                let neg = self.op(&mut out, &base, "Neg", vec![scores.clone()]);
                let mut n = self.node(&base, "Concat", vec![neg, scores.clone()], scores_out);
                n.attribute.push(int_attr("axis", 1));
                out.push(n);
            } else {
                out.push(self.node(&base, "Identity", vec![scores.clone()], scores_out));
            }
        }
        // Votes: the pair's first class when its score is > 0, else the second.
        let zero = self.float_init(&base, "zero", tensor0(0f32));
        let won = self.op(&mut out, &base, "Greater", vec![scores, zero]);
        let won_f32 = self.fresh(&base, "won_f32");
        let mut cast = self.node(&base, "Cast", vec![won], won_f32);
        cast.attribute.push(int_attr("to", DataType::Float as i64));
        let won = cast.output[0].clone();
        out.push(cast);
        let one = self.float_init(&base, "one", tensor0(1f32));
        let lost = self.op(&mut out, &base, "Sub", vec![one, won.clone()]);
        let mi = self.float_init(
            &base,
            "votes_first",
            matrix(pairs, classes, to_i).ok_or("bad votes")?,
        );
        let mj = self.float_init(
            &base,
            "votes_second",
            matrix(pairs, classes, to_j).ok_or("bad votes")?,
        );
        let vi = self.op(&mut out, &base, "MatMul", vec![won, mi]);
        let vj = self.op(&mut out, &base, "MatMul", vec![lost, mj]);
        let votes = self.op(&mut out, &base, "Add", vec![vi, vj]);
        let winner_name = self.fresh(&base, "winner");
        let mut argmax = self.node(&base, "ArgMax", vec![votes], winner_name);
        argmax.attribute.push(int_attr("axis", 1));
        argmax.attribute.push(int_attr("keepdims", 0));
        let mut winner = argmax.output[0].clone();
        out.push(argmax);
        if classes == 2 && coefs.iter().all(|c| *c >= 0.0) {
            // onnxruntime's binary rule: all-positive weights (one vote
            // always reaching 0.5) answer the second label.
            let zero_i = self.int_init(&base, "zero_i64", vec![], vec![0]);
            let one_i = self.int_init(&base, "one_i64", vec![], vec![1]);
            let z = self.op(&mut out, &base, "Mul", vec![winner, zero_i]);
            winner = self.op(&mut out, &base, "Add", vec![z, one_i]);
        }
        let labels = if labels.is_empty() { vec![0] } else { labels };
        let table = self.int_init(&base, "labels", vec![labels.len() as i64], labels);
        let mut gather = self.node(&base, "Gather", vec![table, winner], label_out);
        gather.attribute.push(int_attr("axis", 0));
        out.push(gather);
        Ok(out)
    }

    pub(super) fn ml_tree_regressor(&mut self, node: &NodeProto) -> Result<Vec<NodeProto>, String> {
        let x = input(node, 0).ok_or("no input")?;
        let y = node.output.first().ok_or("no output")?.clone();
        if string(node, "post_transform").is_some_and(|p| p != "NONE") {
            return Err("post_transform other than NONE".into());
        }
        let aggregate = string(node, "aggregate_function").unwrap_or_else(|| "SUM".into());
        if aggregate != "SUM" && aggregate != "AVERAGE" {
            return Err(format!("aggregate_function {aggregate}"));
        }
        if node
            .attribute
            .iter()
            .any(|a| a.name.ends_with("_as_tensor"))
        {
            return Err("attributes given as tensors".into());
        }
        let targets = attr(node, "n_targets")
            .map(|a| a.i.max(1) as usize)
            .unwrap_or(1);
        // At least three pseudo-classes: with fewer, tract's classifier
        // writes the binary layout instead of one column per class.
        let classes = targets.max(3);
        let base = Self::base(node);
        let mut out = vec![];
        let xf = self.as_float(&mut out, &base, x);
        let (name, label, sums) = (
            self.fresh(&base, "trees"),
            self.fresh(&base, "unused_label"),
            self.fresh(&base, "sums"),
        );
        let mut tree = NodeProto {
            name,
            op_type: "TreeEnsembleClassifier".into(),
            domain: "ai.onnx.ml".into(),
            input: vec![xf],
            output: vec![label, sums],
            ..Default::default()
        };
        for a in &node.attribute {
            let mut a = a.clone();
            a.name = match a.name.as_str() {
                n if n.starts_with("nodes_") => n.to_string(),
                "target_ids" => "class_ids".into(),
                "target_nodeids" => "class_nodeids".into(),
                "target_treeids" => "class_treeids".into(),
                "target_weights" => "class_weights".into(),
                _ => continue,
            };
            tree.attribute.push(a);
        }
        tree.attribute.push(tract_onnx::pb::AttributeProto {
            name: "classlabels_int64s".into(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Ints as i32,
            ints: (0..classes as i64).collect(),
            ..Default::default()
        });
        let sums = tree.output[1].clone();
        out.push(tree);
        let starts = self.int_init(&base, "starts", vec![1], vec![0]);
        let ends = self.int_init(&base, "ends", vec![1], vec![targets as i64]);
        let axes = self.int_init(&base, "axes", vec![1], vec![1]);
        let mut t = self.op(&mut out, &base, "Slice", vec![sums, starts, ends, axes]);
        if aggregate == "AVERAGE" {
            let mut trees = ints(node, "nodes_treeids");
            trees.sort_unstable();
            trees.dedup();
            let n = self.float_init(&base, "trees", tensor0(trees.len().max(1) as f32));
            t = self.op(&mut out, &base, "Div", vec![t, n]);
        }
        let base_values = floats(node, "base_values");
        if base_values.is_empty() {
            out.push(self.node(&base, "Identity", vec![t], y));
        } else {
            let b = self.float_init(
                &base,
                "base_values",
                Tensor::from_shape(&[base_values.len()], &base_values)
                    .map_err(|e| e.to_string())?,
            );
            out.push(self.node(&base, "Add", vec![t, b], y));
        }
        Ok(out)
    }
}
