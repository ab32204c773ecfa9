//! Softmax over an axis that is not the last one (f32) as our own tract
//! op: the distribution-focal-loss head of every YOLOv8 and YOLO11 export
//! (a softmax over 16 bins, axis 1 of `[1, 16, 4, anchors]`), and any
//! exporter that leaves the class axis in front.
//!
//! tract 0.23.9 runs such a softmax on its slow path: for every position
//! of the other axes it collapses an ndarray view down to the softmax
//! axis (a strided 1-D view), takes its maximum, subtracts it, sums the
//! exponentials and then computes every exponential a second time to
//! divide it by the sum. On nudenet's YOLOv8n (320 × 320) that one node
//! took 24.0 of 73.3 ms (`--profile`, x86-64). This op does the same
//! arithmetic in the same order per row — the same maximum (the same
//! comparison, NaN included), `x - max`, `exp` from the same libm, the
//! same sequential sum, one division per element — without the views,
//! and with each exponential computed once and kept (it is the same
//! value the second time), so its answers are tract's to the bit.

use std::cmp::Ordering;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisSoftmax {
    /// Length of the softmax axis.
    axis_len: usize,
    /// Values after it (the stride of the axis): more than one.
    inner: usize,
}

impl AxisSoftmax {
    /// The op for a decluttered f32 `Softmax` node over one axis, with
    /// more than one value on it and more than one after it (where tract's
    /// view is not contiguous: its slow path).
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<AxisSoftmax>> {
        let Some(softmax) = node.op_as::<Softmax>() else {
            return Ok(None);
        };
        let x = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        let [axis] = softmax.axes[..] else {
            return Ok(None);
        };
        if softmax.kind != SoftmaxKind::Softmax
            || softmax.quant_output_dt.is_some()
            || x.datum_type != f32::datum_type()
            || axis >= shape.len()
        {
            return Ok(None);
        }
        let (axis_len, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
        Ok((axis_len > 1 && inner > 1).then_some(AxisSoftmax { axis_len, inner }))
    }

    fn run(&self, y: &mut [f32]) -> TractResult<()> {
        let (k, inner) = (self.axis_len, self.inner);
        ensure!(
            y.len().is_multiple_of(k * inner),
            "softmax over {k} x {inner} on {} values",
            y.len()
        );
        for block in y.chunks_exact_mut(k * inner) {
            for i in 0..inner {
                let at = |r: usize| r * inner + i;
                // Iterator::max_by with tract's comparison: the later of
                // two values unless the earlier compares greater.
                let max = (1..k).fold(block[at(0)], |m, r| {
                    let x = block[at(r)];
                    match m.partial_cmp(&x).unwrap_or(Ordering::Less) {
                        Ordering::Greater => m,
                        _ => x,
                    }
                });
                for r in 0..k {
                    block[at(r)] -= max;
                }
                for r in 0..k {
                    block[at(r)] = block[at(r)].exp();
                }
                let sum: f32 = (0..k).map(|r| block[at(r)]).sum();
                for r in 0..k {
                    block[at(r)] /= sum;
                }
            }
        }
        Ok(())
    }
}

impl Op for AxisSoftmax {
    fn name(&self) -> StaticName {
        "OurAxisSoftmax".into()
    }

    op_as_typed_op!();
}

impl EvalOp for AxisSoftmax {
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

impl TypedOp for AxisSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces each softmax over a leading or middle axis of a decluttered
/// `model` with [`AxisSoftmax`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    super::patch::substitute_each(model, AxisSoftmax::of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs;
    use proptest::prelude::*;
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto};

    /// One Softmax over `axis` of an input of `dims`.
    fn model(dims: &[usize], axis: i64) -> ModelProto {
        let softmax = NodeProto {
            op_type: "Softmax".into(),
            name: "softmax".into(),
            input: vec!["x".into()],
            output: vec!["y".into()],
            attribute: vec![AttributeProto {
                name: "axis".into(),
                r#type: AttributeType::Int as i32,
                i: axis,
                ..Default::default()
            }],
            ..Default::default()
        };
        test_graphs::model(
            "softmax",
            vec![softmax],
            vec![],
            vec![test_graphs::float_value("x", dims)],
            vec![test_graphs::untyped_value("y")],
        )
    }

    /// tract's plan and ours: (substituted, tract's output, ours).
    fn both(dims: &[usize], axis: i64, x: &[f32]) -> (usize, Vec<f32>, Vec<f32>) {
        let t = Tensor::from_shape(dims, x).unwrap();
        let (n, given, ours) = test_graphs::decluttered_plans(&model(dims, axis), &t, substitute);
        let values = |t: &Tensor| super::super::patch::plain_slice::<f32>(t).unwrap().to_vec();
        (n, values(&given), values(&ours))
    }

    /// Bits, with every NaN the same.
    fn bits(v: &[f32]) -> Vec<Option<u32>> {
        v.iter()
            .map(|x| (!x.is_nan()).then_some(x.to_bits()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_same_answers_as_tracts_softmax(
            (dims, axis, x) in (1usize..3, 2usize..20, 2usize..6, 1usize..40, 0usize..2, 0.01f32..80.0)
                .prop_flat_map(|(outer, k, mid, last, pick, scale)| {
                    let dims = vec![outer, k, mid, last];
                    let len = outer * k * mid * last;
                    // The softmax over axis 1 (the YOLO head's) or 2.
                    let axis = 1 + pick as i64;
                    (Just(dims), Just(axis), proptest::collection::vec(-scale..scale, len))
                }),
        ) {
            let (n, given, ours) = both(&dims, axis, &x);
            let inner: usize = dims[axis as usize + 1..].iter().product();
            prop_assert_eq!(n, usize::from(inner > 1));
            prop_assert_eq!(bits(&given), bits(&ours));
        }
    }

    #[test]
    fn infinities_and_nans_are_tracts() {
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        // [1, 3, 4]: softmax over the 3, four rows.
        let x = [
            inf, 1.0, nan, -inf, 1.0, inf, 2.0, -inf, 0.0, 2.0, 3.0, -inf,
        ];
        let (n, given, ours) = both(&[1, 3, 4], 1, &x);
        assert_eq!(n, 1);
        assert_eq!(bits(&given), bits(&ours));
    }

    #[test]
    fn the_last_axis_and_single_values_stay_tracts() {
        assert_eq!(both(&[1, 3, 4], -1, &[1.0; 12]).0, 0);
        assert_eq!(both(&[1, 3, 1], 1, &[1.0; 3]).0, 0);
        assert_eq!(both(&[1, 1, 4], 1, &[1.0; 4]).0, 0);
    }
}
