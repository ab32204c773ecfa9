//! An activation QuantizeLinear → DequantizeLinear pair as one tract op.
//!
//! A QDQ graph puts such a pair after nearly every layer: it rounds the
//! float activation onto the int8 grid and back. tract runs the pair as two
//! passes (f32 → i8 into a new buffer, i8 → f32 into another) and its
//! rounding calls libm's `rintf` per element on x86-64, where the baseline
//! has no rounding instruction: a quarter of Visual Wake Words' time. The
//! pair is one element-wise map, `((clamp(round(x / s), lo − zp, hi − zp) +
//! zp − zp') · s'`, done here in place in one pass that the compiler
//! vectorises, and the answers are bit for bit tract's own (the tests hold
//! it to tract's two ops).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8, QuantizeLinearU8};

/// 1.5 · 2²³: for |t| < 2²², `(t + ROUND) − ROUND` is `t` rounded to the
/// nearest integer, ties to even (IEEE round-to-nearest does it), with no
/// rounding instruction or libm call.
const ROUND: f32 = 12_582_912.0;

/// `t.round_ties_even()` for |t| < 2²² (callers clamp first), in two adds
/// that vectorise: x86-64's baseline has no rounding instruction, and
/// `round_ties_even` is a call to libm's `rintf` there.
#[inline(always)]
pub(crate) fn round_ties_even_small(t: f32) -> f32 {
    (t + ROUND) - ROUND
}

/// `QuantizeLinear(x; 1/inv_scale, zp)` then `DequantizeLinear(·; scale, zp')`
/// on f32, in place.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeQuantize {
    /// tract's quantize multiplies by the reciprocal of the ONNX scale.
    inv_scale: f32,
    /// The quantized range less the zero point: `qmin − zp`, `qmax − zp`.
    lo: f32,
    hi: f32,
    /// `zp − zp'`: the quantize's zero point less the dequantize's.
    shift: f32,
    scale: f32,
}

impl Eq for FakeQuantize {}

impl FakeQuantize {
    /// The pair's op when `quantize` is an activation QuantizeLinear tract
    /// can fuse (i8 or u8, one scale) and `dequantize` takes its output.
    fn of(quantize: &TypedNode, dequantize: &TypedNode) -> Option<FakeQuantize> {
        let q = quantize.op_as::<ElementWiseOp>()?;
        let dq = dequantize.op_as::<DequantizeLinearF32>()?;
        let (inv_scale, zp, qmin, qmax) = if let Some(q) = q.0.downcast_ref::<QuantizeLinearI8>() {
            (q.scale, q.zero_point as i32, i8::MIN as i32, i8::MAX as i32)
        } else if let Some(q) = q.0.downcast_ref::<QuantizeLinearU8>() {
            (q.scale, q.zero_point as i32, u8::MIN as i32, u8::MAX as i32)
        } else {
            return None;
        };
        Some(FakeQuantize {
            inv_scale,
            lo: (qmin - zp) as f32,
            hi: (qmax - zp) as f32,
            shift: (zp - dq.zero_point) as f32,
            scale: dq.scale,
        })
    }

    /// One element, as tract's QuantizeLinear then DequantizeLinear give
    /// it: NaN quantizes to the zero point (tract's `as i32` of NaN is 0),
    /// and clamping before rounding is the same as after, the bounds being
    /// integers.
    #[inline(always)]
    fn map(&self, x: f32) -> f32 {
        let t = x * self.inv_scale;
        let t = if t.is_nan() {
            0.0
        } else {
            t.max(self.lo).min(self.hi)
        };
        let rounded = round_ties_even_small(t);
        (rounded + self.shift) * self.scale
    }
}

impl ElementWiseMiniOp for FakeQuantize {
    fn name(&self) -> String {
        "FakeQuantize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "1/scale: {} range: {}..{} shift: {} scale: {}",
            self.inv_scale, self.lo, self.hi, self.shift, self.scale
        )])
    }

    fn eval_in_place(&self, t: &mut Tensor, _out_dt: Option<DatumType>) -> TractResult<()> {
        let mut plain = t.try_as_plain_ram_mut()?;
        self.map_all(plain.as_slice_mut::<f32>()?);
        Ok(())
    }
}

impl FakeQuantize {
    /// [`map`](Self::map) over `xs`, 16 lanes wide where the CPU has
    /// AVX-512, 8 where it has AVX (the x86-64 baseline the binary is built
    /// for has 4). Lane width changes no answer: the map is element by
    /// element.
    #[allow(unsafe_code)]
    fn map_all(&self, xs: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match super::x86::widest() {
            // SAFETY: each needs the instructions `widest` just saw the CPU has.
            super::x86::Width::Avx512 => return unsafe { self.map_all_avx512(xs) },
            super::x86::Width::Avx => return unsafe { self.map_all_avx(xs) },
            super::x86::Width::Baseline => {}
        }
        self.map_all_portable(xs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    fn map_all_avx(&self, xs: &mut [f32]) {
        self.map_all_portable(xs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn map_all_avx512(&self, xs: &mut [f32]) {
        self.map_all_portable(xs)
    }

    #[inline(always)]
    fn map_all_portable(&self, xs: &mut [f32]) {
        for x in xs {
            *x = self.map(*x);
        }
    }
}

impl FakeQuantize {
    /// The op for `Relu` then this pair: a Relu's output quantizes to the
    /// zero point or above, so the Relu is the lower bound raised to zero.
    /// Exactly so: for x < 0 the pair clamps `x / s` to `max(lo, 0)` where
    /// it would have clamped `0 / s`, and any other x, NaN included, maps
    /// as before (a NaN quantizes to the zero point either way). Only for
    /// a positive scale, which keeps the sign of what it scales, and a zero
    /// point inside the quantized range (`lo ≤ 0 ≤ hi`), as ONNX requires.
    fn after_relu(&self) -> Option<FakeQuantize> {
        let zero_in_range = self.lo <= 0.0 && 0.0 <= self.hi;
        (self.inv_scale > 0.0 && zero_in_range).then(|| FakeQuantize {
            lo: 0.0,
            ..self.clone()
        })
    }
}

/// Node `id` when it is a Relu as tract declutters ONNX's — `Max` of the
/// data (first input, the output's own shape) and a constant of zeros —
/// whose output only `reader` takes and the graph does not return.
fn relu_feeding(model: &TypedModel, id: usize, reader: usize) -> TractResult<Option<usize>> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::Max;
    let node = model.node(id);
    let Some(bin) = node.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    if !bin.0.is::<Max>() || bin.1.is_some() || node.inputs.len() != 2 {
        return Ok(None);
    }
    if model.outputs.contains(&OutletId::new(id, 0))
        || model.single_succ(id)?.map(|n| n.id) != Some(reader)
    {
        return Ok(None);
    }
    let data = model.outlet_fact(node.inputs[0])?;
    let zero = model.outlet_fact(node.inputs[1])?;
    let out = model.outlet_fact(OutletId::new(id, 0))?;
    let zeros = match &zero.konst {
        Some(k) if k.datum_type() == f32::datum_type() => k.is_all_zero()?,
        _ => false,
    };
    let f32_data = data.datum_type == f32::datum_type() && data.konst.is_none();
    Ok((zeros && f32_data && data.shape == out.shape).then_some(id))
}

/// Replaces every activation QuantizeLinear → DequantizeLinear pair of a
/// decluttered `model` (the quantize's output read by the dequantize alone)
/// with one [`FakeQuantize`], taking in the Relu before the pair where
/// there is one (see [`FakeQuantize::after_relu`]); returns how many pairs
/// and how many of them took a Relu.
pub fn fuse_pairs(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let mut pairs = Vec::new();
    for node in model.nodes() {
        if let Some(next) = model.single_succ(node.id)? {
            if model.outputs.contains(&OutletId::new(node.id, 0)) {
                continue;
            }
            let Some(op) = FakeQuantize::of(node, next) else {
                continue;
            };
            let relu = match node.inputs.first() {
                Some(input) => relu_feeding(model, input.node, node.id)?,
                None => None,
            };
            match relu.zip(op.after_relu()) {
                Some((relu, op)) => pairs.push((relu, next.id, op, true)),
                None => pairs.push((node.id, next.id, op, false)),
            }
        }
    }
    for (reads, dq, op, _) in &pairs {
        let fused = ElementWiseOp(Box::new(op.clone()), None);
        super::patch::replace_with(model, *reads, *dq, fused)?;
    }
    if !pairs.is_empty() {
        model.compact()?;
    }
    let relus = pairs.iter().filter(|p| p.3).count();
    Ok((pairs.len(), relus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::tract_core::ops::quant::{quantize_linear_f32_i8, quantize_linear_f32_u8};

    fn op(inv_scale: f32, zp: i32, signed: bool, dq_zp: i32, scale: f32) -> FakeQuantize {
        let (qmin, qmax) = if signed { (-128, 127) } else { (0, 255) };
        FakeQuantize {
            inv_scale,
            lo: (qmin - zp) as f32,
            hi: (qmax - zp) as f32,
            shift: (zp - dq_zp) as f32,
            scale,
        }
    }

    /// tract's two ops on one element.
    fn tract_pair(x: f32, inv_scale: f32, zp: i32, signed: bool, dq_zp: i32, scale: f32) -> f32 {
        let q = if signed {
            quantize_linear_f32_i8(x, inv_scale, zp) as i32
        } else {
            quantize_linear_f32_u8(x, inv_scale, zp) as i32
        };
        (q - dq_zp) as f32 * scale
    }

    fn any_input() -> impl Strategy<Value = f32> {
        prop_oneof![
            -300.0f32..300.0,
            // Exact ties once scaled by 1/0.5 = 2: k/2 + 1/4 → k + 0.5.
            (-600i32..600).prop_map(|k| k as f32 * 0.5 + 0.25),
            (-260i32..260).prop_map(|k| k as f32 + 0.5),
            Just(f32::NAN),
            Just(-0.0),
            // Far out of range (tract's own `as i32 + zp` would overflow
            // past ±2³¹, where this op saturates instead).
            Just(1e6),
            Just(-1e6),
        ]
    }

    /// A pair's `(1/scale, zp, signed, zp', scale')`, its zero points
    /// inside the range of its type.
    fn any_pair() -> impl Strategy<Value = (f32, i32, bool, i32, f32)> {
        (
            prop_oneof![Just(1.0f32), Just(2.0f32), 0.01f32..50.0],
            -20i32..20,
            any::<bool>(),
            -20i32..20,
            0.001f32..2.0,
        )
            .prop_map(|(inv_scale, zp, signed, dq_zp, scale)| {
                let shift = if signed { 0 } else { 128 };
                (inv_scale, zp + shift, signed, dq_zp + shift, scale)
            })
    }

    proptest! {
        #[test]
        fn one_pass_is_bit_for_bit_tracts_two_ops(
            x in any_input(),
            (inv_scale, zp, signed, dq_zp, scale) in any_pair(),
        ) {
            let fused = op(inv_scale, zp, signed, dq_zp, scale).map(x);
            let pair = tract_pair(x, inv_scale, zp, signed, dq_zp, scale);
            prop_assert_eq!(fused.to_bits(), pair.to_bits(), "x = {}", x);
        }
    }

    #[test]
    fn ties_round_to_even_like_tract() {
        let q = op(1.0, 0, true, 0, 1.0);
        for (x, want) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (-0.5, 0.0),
            (-1.5, -2.0),
            (126.5, 126.0),
        ] {
            assert_eq!(q.map(x), want, "{x}");
            assert_eq!(tract_pair(x, 1.0, 0, true, 0, 1.0), want, "{x}");
        }
        // Saturation at the int8 range, and NaN at the zero point.
        assert_eq!(q.map(1000.0), 127.0);
        assert_eq!(q.map(-1000.0), -128.0);
        assert_eq!(q.map(f32::INFINITY), 127.0);
        assert_eq!(q.map(f32::NEG_INFINITY), -128.0);
        assert_eq!(op(1.0, 3, true, 0, 0.5).map(f32::NAN), 1.5);
    }

    proptest! {
        /// The Relu taken into the pair gives what the Relu then the pair
        /// give, whichever way the Relu treats NaN (tract's scalar loop
        /// and its vector kernel may differ there).
        #[test]
        fn the_relu_taken_in_is_bit_for_bit_the_relu_then_the_pair(
            x in any_input(),
            (inv_scale, zp, signed, dq_zp, scale) in any_pair(),
        ) {
            let pair = op(inv_scale, zp, signed, dq_zp, scale);
            let with_relu = pair.after_relu().expect("a zero point in range");
            let fused = with_relu.map(x);
            for relu in [x.max(0.0), if x.is_nan() { x } else { x.max(0.0) }] {
                prop_assert_eq!(fused.to_bits(), pair.map(relu).to_bits(), "x = {}", x);
            }
        }
    }

    #[test]
    fn no_relu_is_taken_in_where_the_zero_point_is_out_of_range() {
        assert!(op(1.0, 0, true, 0, 1.0).after_relu().is_some());
        assert!(op(1.0, 0, false, 0, 1.0).after_relu().is_some());
        // zp = 300 on uint8: 0 quantizes to 255, not to the zero point.
        assert!(op(1.0, 300, false, 0, 1.0).after_relu().is_none());
        assert!(op(-1.0, 0, true, 0, 1.0).after_relu().is_none());
    }

    fn decluttered(proto: &tract_onnx::pb::ModelProto) -> TypedModel {
        tract_onnx::onnx()
            .with_ignore_value_info(true)
            .with_ignore_output_shapes(true)
            .model_for_proto_model(proto)
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap()
    }

    fn count(m: &TypedModel, op: &str) -> usize {
        m.nodes().iter().filter(|n| n.op.name() == op).count()
    }

    /// A graph planned with and without the fusion: same outputs, bit for
    /// bit, on inputs that reach every layer. Returns what `fuse_pairs`
    /// counted.
    fn plans_agree(typed: TypedModel, input: &[usize], what: &str) -> (usize, usize) {
        let mut fused = typed.clone();
        let (pairs, relus) = fuse_pairs(&mut fused).unwrap();
        assert_eq!(count(&fused, "FakeQuantize"), pairs);
        assert_eq!(count(&typed, "FakeQuantize"), 0);
        assert_eq!(count(&typed, "Max") - count(&fused, "Max"), relus);
        let given = typed.into_optimized().unwrap().into_runnable().unwrap();
        let fused = fused.into_optimized().unwrap().into_runnable().unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..8 {
            let n: usize = input.iter().product();
            let x: Vec<f32> = (0..n).map(|_| rng.f32() * 6.0 - 3.0).collect();
            let x = tract_ndarray::Array::from_shape_vec(input, x).unwrap();
            let a = given.run(tvec!(Tensor::from(x.clone()).into())).unwrap();
            let b = fused.run(tvec!(Tensor::from(x).into())).unwrap();
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(**a, **b, "{what}");
            }
        }
        (pairs, relus)
    }

    fn from_path(path: &str) -> TypedModel {
        let path = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap();
        decluttered(&crate::model::backend::tract::decode(&bytes).unwrap())
    }

    #[test]
    fn a_qdq_graph_gives_the_same_answers_with_its_pairs_fused() {
        let objects = from_path("models/objects.onnx");
        assert!(plans_agree(objects, &[1, 3, 120, 160], "objects").0 >= 10);
        let activity = from_path("models/activity.onnx");
        assert!(plans_agree(activity, &[1, 50, 6], "activity").0 >= 4);
    }

    /// x → Relu → Q → DQ → y takes the Relu in; y → Relu → Q → DQ → z,
    /// where that Relu's output is returned too, keeps it.
    #[test]
    fn a_relu_read_by_the_pair_alone_is_taken_in() {
        use crate::model::test_graphs::{float_value, model, node, untyped_value};
        use tract_onnx::pb::tensor_proto::DataType;
        use tract_onnx::pb::TensorProto;
        let scalar = |name: &str, data_type: DataType, f: Vec<f32>, i: Vec<i32>| TensorProto {
            name: name.into(),
            data_type: data_type as i32,
            float_data: f,
            int32_data: i,
            ..Default::default()
        };
        let proto = model(
            "relu_qdq",
            vec![
                node("Relu", &["x"], "r", vec![]),
                node("QuantizeLinear", &["r", "s", "zp"], "q", vec![]),
                node("DequantizeLinear", &["q", "s", "zp"], "y", vec![]),
                node("Relu", &["y"], "kept", vec![]),
                node("QuantizeLinear", &["kept", "s", "zp"], "q2", vec![]),
                node("DequantizeLinear", &["q2", "s", "zp"], "z", vec![]),
            ],
            vec![
                scalar("s", DataType::Float, vec![0.05], vec![]),
                scalar("zp", DataType::Int8, vec![], vec![-3]),
            ],
            vec![float_value("x", &[1, 4, 8, 8])],
            vec![
                untyped_value("y"),
                untyped_value("kept"),
                untyped_value("z"),
            ],
        );
        let typed = decluttered(&proto);
        assert_eq!(count(&typed, "Max"), 2);
        assert_eq!(plans_agree(typed, &[1, 4, 8, 8], "relu_qdq"), (2, 1));
    }
}
