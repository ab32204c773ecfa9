//! Constant padding of an f32 tensor as our own tract op.
//!
//! tract 0.23.9 pads by filling a new array with the constant and then
//! assigning the input into a slice of it through ndarray's dynamic-rank
//! views, element by element; on a channel-last image with three channels
//! that is slow (the `Pad` that tract's optimiser puts before the first
//! convolution of Visual Wake Words, `[1, 96, 96, 3]`, was 7 % of the
//! model by `--profile`). This op fills the output with the constant and
//! copies the input in as runs of contiguous values: everything from the
//! innermost padded axis inwards is one run per index of the axes outside
//! it. It only copies, so its answers are tract's, value for value.
//!
//! It replaces `Pad` nodes of the optimised plan (tract adds them while
//! optimising a convolution), so it runs after tract's passes, not before.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};

#[derive(Debug, Clone, PartialEq)]
pub struct ConstantPad {
    input_shape: TVec<usize>,
    pads: TVec<(usize, usize)>,
    value: f32,
    output_shape: TVec<usize>,
}

impl Eq for ConstantPad {}

impl ConstantPad {
    /// The op for a `Pad` node of constant mode over an f32 tensor of
    /// concrete shape.
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<ConstantPad>> {
        let Some(pad) = node.op_as::<Pad>() else {
            return Ok(None);
        };
        let PadMode::Constant(value) = &pad.mode else {
            return Ok(None);
        };
        let x = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        if x.datum_type != f32::datum_type() || pad.pads.len() != shape.len() {
            return Ok(None);
        }
        let Ok(value) = value.cast_to_scalar::<f32>() else {
            return Ok(None);
        };
        Ok(Some(ConstantPad::new(shape, &pad.pads, value)))
    }

    fn new(input_shape: &[usize], pads: &[(usize, usize)], value: f32) -> ConstantPad {
        let output_shape = input_shape
            .iter()
            .zip(pads)
            .map(|(d, (before, after))| d + before + after)
            .collect();
        ConstantPad {
            input_shape: input_shape.into(),
            pads: pads.into(),
            value,
            output_shape,
        }
    }

    /// Pads `x` into `y`, which holds the output's number of values, all
    /// of them the constant already: only the input's are written.
    fn run(&self, x: &[f32], y: &mut [f32]) {
        let rank = self.input_shape.len();
        // Axes from the innermost padded one inwards make one contiguous
        // run in the input and, the inner ones being unpadded, in the output.
        let k = (0..rank)
            .rev()
            .find(|a| self.pads[*a] != (0, 0))
            .unwrap_or(0);
        let run: usize = self.input_shape[k..].iter().product();
        if run == 0 {
            return;
        }
        let out_strides: TVec<usize> = (0..rank)
            .map(|a| self.output_shape[a + 1..].iter().product())
            .collect();
        let first = self.pads.get(k).map_or(0, |p| p.0 * out_strides[k]);
        for (i, chunk) in x.chunks_exact(run).enumerate() {
            let mut rest = i;
            let mut at = first;
            for a in (0..k).rev() {
                let d = self.input_shape[a];
                at += (rest % d + self.pads[a].0) * out_strides[a];
                rest /= d;
            }
            y[at..at + run].copy_from_slice(chunk);
        }
    }
}

impl Op for ConstantPad {
    fn name(&self) -> StaticName {
        "OurConstantPad".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} padded by {:?} with {}",
            self.input_shape, self.pads, self.value
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ConstantPad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let len = self.input_shape.iter().product();
        super::patch::eval_f32("pad", &inputs[0], len, &self.output_shape, |x, y| {
            if self.value.to_bits() != 0 {
                y.fill(self.value);
            }
            self.run(x, y)
        })
    }
}

impl TypedOp for ConstantPad {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Replaces each constant `Pad` of f32 in an optimised `model` with
/// [`ConstantPad`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    super::patch::substitute_each(model, ConstantPad::of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs::{
        self, float_tensor, float_value, ints, model, node, untyped_value,
    };
    use proptest::prelude::*;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::TensorProto;

    /// tract's own Pad on `x`.
    fn tracts(shape: &[usize], pads: &[(usize, usize)], value: f32, x: &[f32]) -> Tensor {
        let pad = Pad::new(pads.to_vec(), PadMode::Constant(Arc::new(value.into())));
        let x = Tensor::from_shape(shape, x).unwrap();
        let ctx = EvalContext::out_of_plan();
        pad.eval(&ctx, tvec!(x.into_tvalue())).unwrap()[0]
            .clone()
            .into_tensor()
    }

    fn padded(pad: &ConstantPad, x: &[f32]) -> Vec<f32> {
        let mut y = vec![pad.value; pad.output_shape.iter().product()];
        pad.run(x, &mut y);
        y
    }

    fn cases() -> impl Strategy<Value = (Vec<usize>, Vec<(usize, usize)>, f32)> {
        (1usize..=5)
            .prop_flat_map(|rank| {
                (
                    prop::collection::vec(0usize..6, rank),
                    prop::collection::vec((0usize..3, 0usize..3), rank),
                    prop_oneof![Just(0.0f32), -5.0f32..5.0],
                )
            })
            .prop_filter("not too large", |(shape, pads, _)| {
                shape
                    .iter()
                    .zip(pads)
                    .map(|(d, p)| d + p.0 + p.1)
                    .product::<usize>()
                    < 20_000
            })
    }

    proptest! {
        #[test]
        fn the_same_values_as_tracts_pad((shape, pads, value) in cases(), seed in any::<u64>()) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.f32() - 0.5).collect();
            let ours = ConstantPad::new(&shape, &pads, value);
            let y = Tensor::from_shape(&ours.output_shape, &padded(&ours, &x)).unwrap();
            prop_assert_eq!(y, tracts(&shape, &pads, value, &x));
        }
    }

    #[test]
    fn an_image_padded_on_its_plane_alone() {
        // [1, 2, 3, 2] channel-last, one row above, one column after.
        let x: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let pad = ConstantPad::new(&[1, 2, 3, 2], &[(0, 0), (1, 0), (0, 1), (0, 0)], 0.0);
        #[rustfmt::skip]
        let want = [
            0., 0.,  0., 0.,  0., 0.,  0., 0.,
            1., 2.,  3., 4.,  5., 6.,  0., 0.,
            7., 8.,  9., 10., 11., 12., 0., 0.,
        ];
        assert_eq!(padded(&pad, &x), want);
    }

    /// The `Pad` nodes of `proto`'s optimised plan become ours, and the
    /// plan answers as before; returns how many there were.
    fn plans_agree(proto: &tract_onnx::pb::ModelProto, input: &[usize]) -> usize {
        test_graphs::optimised_plans_agree(proto, input, substitute, |n| n.op_is::<Pad>())
    }

    /// An ONNX `Pad` of a channel-last image (the layout where tract's
    /// per-element assign is slowest) before a Relu, on every architecture.
    #[test]
    fn a_pad_of_the_graph_plans_with_ours_and_answers_the_same() {
        let pads = TensorProto {
            name: "pads".into(),
            data_type: DataType::Int64 as i32,
            dims: vec![8],
            int64_data: vec![0, 1, 0, 0, 0, 2, 1, 0],
            ..Default::default()
        };
        let value = float_tensor("value", &[], vec![0.25]);
        let proto = model(
            "padded_relu",
            vec![
                node("Pad", &["x", "pads", "value"], "p", vec![]),
                node("Relu", &["p"], "y", vec![]),
            ],
            vec![pads, value],
            vec![float_value("x", &[1, 20, 20, 3])],
            vec![untyped_value("y")],
        );
        assert_eq!(plans_agree(&proto, &[1, 20, 20, 3]), 1);
    }

    /// A strided convolution with padding: on x86-64 tract's optimiser
    /// puts a `Pad` before it (lazy im2col); elsewhere its choice of
    /// kernel may not.
    #[test]
    fn a_padded_convolution_plans_with_ours_and_answers_the_same() {
        let mut rng = fastrand::Rng::with_seed(3);
        let w = float_tensor(
            "w",
            &[8, 3, 3, 3],
            (0..8 * 27).map(|_| rng.f32() - 0.5).collect(),
        );
        let proto = model(
            "padded_conv",
            vec![node(
                "Conv",
                &["x", "w"],
                "y",
                vec![
                    ints("kernel_shape", &[3, 3]),
                    ints("strides", &[2, 2]),
                    ints("pads", &[0, 0, 1, 1]),
                ],
            )],
            vec![w],
            vec![float_value("x", &[1, 3, 24, 24])],
            vec![untyped_value("y")],
        );
        let pads = plans_agree(&proto, &[1, 3, 24, 24]);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(pads, 1);
        }
    }
}
