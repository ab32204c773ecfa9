//! Softmax over rows of two (f32) as our own tract op: a detector's
//! background/face or no/yes scores, one row per anchor (UltraFace has
//! 4420 of them).
//!
//! tract 0.23.9 runs a softmax whose rows are not a multiple of four
//! long row by row, with three of its vector kernels per row (maximum,
//! `exp(x - max)` with the sum, scaling); on rows of two that costs more
//! than the arithmetic (UltraFace slim's Softmax took 1.54 ms of its 8.57
//! by `--profile`; README, Known issues). This op takes each row's
//! maximum off the row first, then runs tract's own exponential kernel
//! once over the whole tensor (with a maximum of 0, which subtracts nothing), then adds the
//! pair and scales it by the reciprocal as tract does. Every step is
//! tract's arithmetic — the same exponential, one addition of two terms,
//! one multiplication — so the answers are tract's to the bit. A row with
//! a NaN gives NaN twice (tract's answer there depends on how its maximum
//! kernel orders NaN).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_core::tract_linalg::Func;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairSoftmax;

impl PairSoftmax {
    /// The op for a decluttered `Softmax` node over the last axis of an
    /// f32 tensor whose last axis has length 2.
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<PairSoftmax>> {
        let Some(softmax) = node.op_as::<Softmax>() else {
            return Ok(None);
        };
        let x = model.outlet_fact(node.inputs[0])?;
        let rank = x.rank();
        let pairs = rank > 0 && x.shape[rank - 1].to_usize().ok() == Some(2);
        let fits = softmax.kind == SoftmaxKind::Softmax
            && softmax.quant_output_dt.is_none()
            && x.datum_type == f32::datum_type()
            && *softmax.axes == [rank - 1]
            && pairs;
        Ok(fits.then_some(PairSoftmax))
    }

    fn run(&self, y: &mut [f32]) -> TractResult<()> {
        ensure!(
            y.len().is_multiple_of(2),
            "pair softmax over {} values",
            y.len()
        );
        let mut nan_rows = Vec::new();
        for (i, row) in y.chunks_exact_mut(2).enumerate() {
            if row[0].is_nan() || row[1].is_nan() {
                nan_rows.push(i);
            }
            let max = if row[0] >= row[1] { row[0] } else { row[1] };
            row[0] -= max;
            row[1] -= max;
        }
        // tract's kernel computes `exp(x - max)`; `x - 0` is `x`.
        Func::Softmax2.map_reduce_f32()?.run_with_params(y, 0.0)?;
        for row in y.chunks_exact_mut(2) {
            let scale = (row[0] + row[1]).recip();
            row[0] *= scale;
            row[1] *= scale;
        }
        for i in nan_rows {
            y[2 * i..2 * i + 2].fill(f32::NAN);
        }
        Ok(())
    }
}

impl Op for PairSoftmax {
    fn name(&self) -> StaticName {
        "OurPairSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PairSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs.into_iter().next().context("softmax without input")?;
        let mut y = input.into_tensor();
        {
            let mut plain = y.try_as_plain_ram_mut()?;
            self.run(plain.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for PairSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces each softmax over pairs of a decluttered `model` with
/// [`PairSoftmax`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    super::patch::substitute_each(model, PairSoftmax::of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs;
    use proptest::prelude::*;
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto};

    /// One Softmax over the last axis of a `[1, rows, width]` input.
    fn model(rows: usize, width: usize) -> ModelProto {
        let dims = [1, rows, width];
        let softmax = NodeProto {
            op_type: "Softmax".into(),
            name: "softmax".into(),
            input: vec!["x".into()],
            output: vec!["y".into()],
            attribute: vec![AttributeProto {
                name: "axis".into(),
                r#type: AttributeType::Int as i32,
                i: -1,
                ..Default::default()
            }],
            ..Default::default()
        };
        test_graphs::model(
            "softmax",
            vec![softmax],
            vec![],
            vec![test_graphs::float_value("x", &dims)],
            vec![test_graphs::untyped_value("y")],
        )
    }

    /// tract's plan and ours on `x`: (substituted, tract's output, ours).
    fn both(width: usize, x: &[f32]) -> (usize, Vec<f32>, Vec<f32>) {
        let rows = x.len() / width;
        let x = Tensor::from_shape(&[1, rows, width], x).unwrap();
        let (n, given, ours) = test_graphs::decluttered_plans(&model(rows, width), &x, substitute);
        let values = |t: &Tensor| super::super::patch::plain_slice::<f32>(t).unwrap().to_vec();
        (n, values(&given), values(&ours))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_same_answers_as_tracts_softmax(
            x in (1usize..300, 0.01f32..300.0).prop_flat_map(|(rows, scale)| {
                proptest::collection::vec(-scale..scale, 2 * rows)
            }),
        ) {
            let (n, given, ours) = both(2, &x);
            prop_assert_eq!(n, 1);
            prop_assert_eq!(bits(&given), bits(&ours));
        }
    }

    #[test]
    fn infinities_are_tracts_and_a_nan_row_is_nan() {
        let inf = f32::INFINITY;
        let x = [
            inf, 1.0, -inf, -inf, -inf, 3.0, 0.0, -0.0, -200.0, 200.0, 5.0, 5.0,
        ];
        let (n, given, ours) = both(2, &x);
        assert_eq!(n, 1);
        let nan_or_bits = |v: &[f32]| {
            v.iter()
                .map(|x| (!x.is_nan()).then_some(x.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(nan_or_bits(&given), nan_or_bits(&ours));
        assert_eq!(&ours[8..], [0.0, 1.0, 0.5, 0.5]);

        let (_, _, ours) = both(2, &[f32::NAN, 1.0, 1.0, 3.0]);
        assert!(ours[0].is_nan() && ours[1].is_nan(), "{ours:?}");
        assert!((ours[3] - 0.880_797).abs() < 1e-6, "{ours:?}");
    }

    #[test]
    fn rows_of_other_lengths_stay_tracts() {
        assert_eq!(both(3, &[1.0; 6]).0, 0);
        assert_eq!(both(1, &[1.0; 6]).0, 0);
    }
}
