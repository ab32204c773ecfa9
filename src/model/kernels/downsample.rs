//! tract's `Downsample` (every `stride`-th index of one axis, from
//! `modulo`) of an f32 tensor as our own op.
//!
//! tract puts a Downsample before a strided 1×1 convolution (a ResNet
//! shortcut) and runs it as an ndarray slice turned into an owned array
//! and then copied into a tensor: element by element through a strided
//! view, and twice. ResNet-8's four took 0.050 ms of its 0.49 by `--profile`.
//! This op copies each kept index's inner block (everything inside the
//! axis, contiguous) straight into the output. It only copies, so its
//! answers are tract's, value for value.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Downsample;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedCopy {
    input_shape: TVec<usize>,
    axis: usize,
    stride: usize,
    modulo: usize,
    output_shape: TVec<usize>,
}

impl StridedCopy {
    /// The op for a `Downsample` node of positive stride over an f32
    /// tensor of concrete shape.
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<StridedCopy>> {
        let Some(down) = node.op_as::<Downsample>() else {
            return Ok(None);
        };
        let x = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        let fits = x.datum_type == f32::datum_type()
            && down.stride > 0
            && down.axis < shape.len()
            && down.modulo <= shape[down.axis];
        Ok(fits.then(|| StridedCopy::new(shape, down.axis, down.stride as usize, down.modulo)))
    }

    fn new(input_shape: &[usize], axis: usize, stride: usize, modulo: usize) -> StridedCopy {
        let mut output_shape: TVec<usize> = input_shape.into();
        output_shape[axis] = (input_shape[axis] - modulo).div_ceil(stride);
        StridedCopy {
            input_shape: input_shape.into(),
            axis,
            stride,
            modulo,
            output_shape,
        }
    }

    /// Copies the kept indices of `x` into `y`, which holds the output's
    /// number of values.
    fn run(&self, x: &[f32], y: &mut [f32]) {
        let inner: usize = self.input_shape[self.axis + 1..].iter().product();
        let along = self.input_shape[self.axis] * inner;
        let kept = self.output_shape[self.axis] * inner;
        if inner == 0 || kept == 0 {
            return;
        }
        for (from, to) in x.chunks_exact(along).zip(y.chunks_exact_mut(kept)) {
            if inner == 1 {
                // The last axis (a channel-first plane's columns): values.
                let values = from[self.modulo..].iter().step_by(self.stride);
                for (out, v) in to.iter_mut().zip(values) {
                    *out = *v;
                }
                continue;
            }
            let blocks = from[self.modulo * inner..]
                .chunks(inner)
                .step_by(self.stride);
            for (block, out) in blocks.zip(to.chunks_exact_mut(inner)) {
                out.copy_from_slice(block);
            }
        }
    }
}

impl Op for StridedCopy {
    fn name(&self) -> StaticName {
        "OurDownsample".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?}, axis {} every {} from {}",
            self.input_shape, self.axis, self.stride, self.modulo
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for StridedCopy {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let len = self.input_shape.iter().product();
        super::patch::eval_f32("downsample", &inputs[0], len, &self.output_shape, |x, y| {
            self.run(x, y)
        })
    }
}

impl TypedOp for StridedCopy {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Replaces each positive-stride f32 `Downsample` of an optimised `model`
/// with [`StridedCopy`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    super::patch::substitute_each(model, StridedCopy::of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs::{
        self, float_tensor, float_value, ints, model, node, untyped_value,
    };
    use proptest::prelude::*;

    fn cases() -> impl Strategy<Value = (Vec<usize>, usize, usize, usize)> {
        (1usize..=4)
            .prop_flat_map(|rank| {
                (
                    prop::collection::vec(0usize..7, rank),
                    0..rank,
                    1usize..4,
                    0usize..3,
                )
            })
            .prop_filter("modulo inside the axis", |(shape, axis, _, modulo)| {
                *modulo <= shape[*axis]
            })
    }

    proptest! {
        #[test]
        fn the_same_values_as_tracts_downsample(
            (shape, axis, stride, modulo) in cases(),
            seed in any::<u64>(),
        ) {
            let mut rng = fastrand::Rng::with_seed(seed);
            let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.f32()).collect();
            let ours = StridedCopy::new(&shape, axis, stride, modulo);
            let mut y = vec![f32::NAN; ours.output_shape.iter().product()];
            ours.run(&x, &mut y);
            let y = Tensor::from_shape(&ours.output_shape, &y).unwrap();
            let down = Downsample::new(axis, stride as isize, modulo);
            let x = Tensor::from_shape(&shape, &x).unwrap();
            let ctx = EvalContext::out_of_plan();
            let tracts = down.eval(&ctx, tvec!(x.into_tvalue())).unwrap()[0].clone().into_tensor();
            prop_assert_eq!(y, tracts);
        }
    }

    /// A 1×1 convolution of stride 2 (a ResNet shortcut): tract plans a
    /// Downsample before it, which becomes ours, and the plan answers as
    /// before.
    #[test]
    fn a_strided_pointwise_convolution_plans_with_ours_and_answers_the_same() {
        let mut rng = fastrand::Rng::with_seed(5);
        let w = float_tensor(
            "w",
            &[8, 4, 1, 1],
            (0..32).map(|_| rng.f32() - 0.5).collect(),
        );
        let proto = model(
            "shortcut",
            vec![node(
                "Conv",
                &["x", "w"],
                "y",
                vec![ints("kernel_shape", &[1, 1]), ints("strides", &[2, 2])],
            )],
            vec![w],
            vec![float_value("x", &[1, 4, 9, 10])],
            vec![untyped_value("y")],
        );
        let downs = test_graphs::optimised_plans_agree(&proto, &[1, 4, 9, 10], substitute, |n| {
            n.op_is::<Downsample>()
        });
        assert!(downs > 0);
    }
}
