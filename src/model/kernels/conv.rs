//! 2-D convolution (one group, f32, channel-first data) as our own tract
//! op: the input's patches copied into a matrix once (im2col), then the
//! register-blocked product of [`pointwise`](super::pointwise) with the
//! weights.
//!
//! tract runs such a layer as `LazyIm2col` and `OptMatMul`: its kernel
//! reads the patches through the lazy im2col's packing, which ran the
//! bundled detector's layers at 11–61 billion multiply-adds a second on
//! this host (their `--profile` times; the 3-channel stride-2 first
//! layer slowest). Here the copy is made row by row — for stride 1,
//! each output row of a tap is one contiguous run of the input — and the
//! product runs on full blocks.
//!
//! The patch matrix's rows are in tract's order (input channel, then
//! kernel row, then kernel column), a tap over the padding is a zero,
//! and each output is the chain of fused multiply-adds over that order
//! from zero, then the bias: tract's arithmetic, so tract's answers (the
//! tests compare them number for number).

use super::pointwise::{best_tile, feeds_a_constant_step, multiply, planned, Bias, Right, Tile};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

#[derive(Debug, Clone, PartialEq)]
pub struct PatchConv {
    channels: usize,
    outputs: usize,
    input_hw: [usize; 2],
    output_hw: [usize; 2],
    kernel_hw: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pad_before: [usize; 2],
    tile: Tile,
    /// `[out][in · kh · kw]`, tract's kernel layout.
    weights: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
    output_shape: TVec<usize>,
}

impl Eq for PatchConv {}

impl PatchConv {
    /// The op for a decluttered `Conv` node of one group over
    /// channel-first f32 data of batch 1 with a constant finite kernel
    /// and bias, and a kernel larger than one tap or strides (1×1 ones
    /// are matrix products already).
    /// Not for a layer whose output goes on to a constant step (see
    /// [`feeds_a_constant_step`]).
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<PatchConv>> {
        if feeds_a_constant_step(model, node.id)? {
            return Ok(None);
        }
        Self::of_where(model, node, pays)
    }

    /// [`of`](Self::of), for the layers `take` picks.
    fn of_where(
        model: &TypedModel,
        node: &TypedNode,
        take: fn(usize, usize, [usize; 2]) -> bool,
    ) -> TractResult<Option<PatchConv>> {
        let Some(facts) = super::patch::ConvFacts::of(model, node)? else {
            return Ok(None);
        };
        let spec = &facts.conv.pool_spec;
        let (c, o) = (spec.input_channels, spec.output_channels);
        let [kh, kw] = facts.kernel_hw;
        let points = facts.output_hw[0] * facts.output_hw[1];
        if facts.conv.group != 1
            || facts.channels_last
            || (kh * kw == 1 && facts.strides == [1, 1])
            || o < 2
            || points < 2
            || !take(c, points, facts.strides)
        {
            return Ok(None);
        }
        let (_, tile) = best_tile(o, c * kh * kw, points);
        let mut output_shape: TVec<usize> = facts.shape.into();
        let r = output_shape.len();
        output_shape[r - 3] = o;
        output_shape[r - 2] = facts.output_hw[0];
        output_shape[r - 1] = facts.output_hw[1];
        let bias = facts.bias;
        Ok(Some(PatchConv {
            channels: c,
            outputs: o,
            input_hw: facts.hw,
            output_hw: facts.output_hw,
            kernel_hw: [kh, kw],
            strides: facts.strides,
            dilations: facts.dilations,
            pad_before: facts.pad_before,
            tile,
            weights: Arc::new(facts.kernel.to_vec()),
            bias: bias.iter().any(|b| *b != 0.0).then(|| Arc::new(bias)),
            output_shape,
        }))
    }

    /// The patch matrix `[in · kh · kw][points]`, packed in blocks of
    /// `nr` points (see [`Right::Panels`]), taps over the padding zero;
    /// its first value 64-byte aligned.
    #[inline(always)]
    fn patches(&self, x: &[f32], nr: usize, packed: &mut Vec<f32>) -> usize {
        let [h, w] = self.input_hw;
        let [oh, ow] = self.output_hw;
        let [kh, kw] = self.kernel_hw;
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        let [ph, pw] = self.pad_before;
        let k = self.channels * kh * kw;
        let points = oh * ow;
        let len = points.next_multiple_of(nr) * k;
        packed.clear();
        packed.resize(len + 16, 0f32);
        let start = packed.as_ptr().align_offset(64).min(16);
        let b = &mut packed[start..start + len];
        // The output columns whose input column is in the plane, for
        // kernel column `kx`: `lo..hi`.
        let columns = |kx: usize| {
            let offset = (kx * dw) as isize - pw as isize;
            let lo = (0..ow)
                .find(|&ox| (ox * sw) as isize + offset >= 0)
                .unwrap_or(ow);
            let hi = (lo..ow)
                .find(|&ox| (ox * sw) as isize + offset >= w as isize)
                .unwrap_or(ow);
            (lo, hi, offset)
        };
        let spans: Vec<(usize, usize, isize)> = (0..kw).map(columns).collect();
        for c in 0..self.channels {
            let plane = &x[c * h * w..][..h * w];
            for ky in 0..kh {
                for (kx, &(lo, hi, offset)) in spans.iter().enumerate() {
                    let row = (c * kh + ky) * kw + kx;
                    for oy in 0..oh {
                        let iy = (oy * sh + ky * dh) as isize - ph as isize;
                        if iy < 0 || iy >= h as isize || lo >= hi {
                            continue;
                        }
                        let input = &plane[iy as usize * w..][..w];
                        let first = ((lo * sw) as isize + offset) as usize;
                        // Points oy·ow + lo .. oy·ow + hi, split where
                        // the blocks of `nr` points meet.
                        let mut p = oy * ow + lo;
                        let end = oy * ow + hi;
                        let mut from = first;
                        while p < end {
                            let run = (nr - p % nr).min(end - p);
                            let at = (p / nr) * k * nr + row * nr + p % nr;
                            let out = &mut b[at..at + run];
                            if sw == 1 {
                                out.copy_from_slice(&input[from..from + run]);
                            } else {
                                let input = &input[from..from + (run - 1) * sw + 1];
                                for (j, o) in out.iter_mut().enumerate() {
                                    *o = input[j * sw];
                                }
                            }
                            p += run;
                            from += run * sw;
                        }
                    }
                }
            }
        }
        start
    }

    /// Writes every value of `y`. Only called where [`planned`] holds.
    #[allow(unsafe_code)]
    fn run(&self, x: &[f32], y: &mut [f32]) {
        assert!(
            planned(),
            "conv op planned on a CPU without AVX-512F and FMA"
        );
        // SAFETY: `planned` saw the CPU has AVX-512F and FMA.
        unsafe { self.run_avx512(x, y) }
    }

    #[target_feature(enable = "avx512f,fma")]
    fn run_avx512(&self, x: &[f32], y: &mut [f32]) {
        let mut packed = Vec::new();
        let start = self.patches(x, self.tile.columns(), &mut packed);
        let k = self.channels * self.kernel_hw[0] * self.kernel_hw[1];
        let points = self.output_hw[0] * self.output_hw[1];
        let bias = self.bias.as_deref().map(|b| Bias::Rows(b));
        multiply(
            self.tile,
            &self.weights,
            self.outputs,
            k,
            Right::Panels(&packed[start..]),
            points,
            y,
            bias,
        )
    }
}

/// Where the op ran faster than tract's on x86-64 (by `--profile`, on
/// ResNet-8 and the bundled detector): first layers of a few channels,
/// whatever the stride (ResNet's 3 → 16 layer 0.044 → 0.014 ms, the
/// detector's stride-2 one 0.19 → 0.10), and stride-1 layers of 256 or
/// more points (ResNet's 16 → 16 on 32×32 0.092 → 0.058). Strided layers
/// of 16 or more channels ran 1.1–1.3× slower (the copies of the patches
/// gather every other value), and so did 64 → 64 on 8×8.
fn pays(channels: usize, points: usize, strides: [usize; 2]) -> bool {
    points >= 2 && (channels <= 4 || (strides == [1, 1] && points >= 256))
}

impl Op for PatchConv {
    fn name(&self) -> StaticName {
        "OurPatchConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} → {} channels, {:?} → {:?}, kernel {:?}, strides {:?}, dilations {:?}, {:?}",
            self.channels,
            self.outputs,
            self.input_hw,
            self.output_hw,
            self.kernel_hw,
            self.strides,
            self.dilations,
            self.tile
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PatchConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [h, w] = self.input_hw;
        let len = self.channels * h * w;
        super::patch::eval_f32(
            "convolution",
            &inputs[0],
            len,
            &self.output_shape,
            |x, y| self.run(x, y),
        )
    }
}

impl TypedOp for PatchConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Replaces each convolution of a decluttered `model` that [`PatchConv`]
/// takes; returns how many. Only where the CPU has AVX-512F and FMA.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    if planned() {
        super::patch::substitute_each(model, PatchConv::of)
    } else {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs::{self, float_tensor, ints};
    use proptest::prelude::*;
    use tract_onnx::pb::ModelProto;

    #[derive(Debug, Clone)]
    struct Case {
        channels: usize,
        outputs: usize,
        hw: [usize; 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        /// top, left, bottom, right
        pads: [usize; 4],
        bias: bool,
    }

    fn model(case: &Case) -> ModelProto {
        let (c, o) = (case.channels, case.outputs);
        let [kh, kw] = case.kernel;
        let mut rng = fastrand::Rng::with_seed((c * 97 + o * 7 + kh) as u64);
        let mut initializer = vec![float_tensor(
            "w",
            &[o, c, kh, kw],
            (0..o * c * kh * kw)
                .map(|_| rng.f32() * 2.0 - 1.0)
                .collect(),
        )];
        let mut inputs = vec!["x", "w"];
        if case.bias {
            initializer.push(float_tensor(
                "b",
                &[o],
                (0..o).map(|_| rng.f32() - 0.5).collect(),
            ));
            inputs.push("b");
        }
        let conv = test_graphs::node(
            "Conv",
            &inputs,
            "y",
            vec![
                ints("kernel_shape", &case.kernel),
                ints("strides", &case.strides),
                ints("dilations", &case.dilations),
                ints("pads", &case.pads),
            ],
        );
        let [h, w] = case.hw;
        test_graphs::model(
            "conv",
            vec![conv],
            initializer,
            vec![test_graphs::float_value("x", &[1, c, h, w])],
            vec![test_graphs::untyped_value("y")],
        )
    }

    fn cases() -> impl Strategy<Value = Case> {
        (
            (1usize..24, 2usize..80, 1usize..24, 1usize..24),
            (1usize..5, 1usize..5, 1usize..4, 1usize..4),
            (
                1usize..3,
                1usize..3,
                [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            ),
            any::<bool>(),
        )
            .prop_map(
                |((c, o, h, w), (kh, kw, sh, sw), (dh, dw, pads), bias)| Case {
                    channels: c,
                    outputs: o,
                    hw: [h, w],
                    kernel: [kh, kw],
                    strides: [sh, sw],
                    dilations: [dh, dw],
                    pads,
                    bias,
                },
            )
            .prop_filter("an output at least 1×2", |c| {
                let out = |a: usize| {
                    let span = c.hw[a] + c.pads[a] + c.pads[a + 2];
                    let k = c.dilations[a] * (c.kernel[a] - 1) + 1;
                    if span < k {
                        0
                    } else {
                        (span - k) / c.strides[a] + 1
                    }
                };
                out(0) * out(1) >= 2
            })
            // A 1×1 kernel, strided or not, tract declutters into a matrix
            // product (after a downsample): no Conv is left to take.
            .prop_filter("more than one tap", |c| c.kernel != [1, 1])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn the_same_answers_as_tracts_convolution(case in cases()) {
            if !planned() {
                eprintln!("no AVX-512F and FMA here: the op is not planned, nothing to compare");
                return Ok(());
            }
            let [h, w] = case.hw;
            let x = test_graphs::seeded(&[1, case.channels, h, w], 9);
            let (n, given, ours) = test_graphs::decluttered_plans(&model(&case), &x, |m| {
                super::super::patch::substitute_each(m, |m, node| {
                    PatchConv::of_where(m, node, |_, _, _| true)
                })
            });
            prop_assert_eq!(n, 1);
            let values = |t: &Tensor| super::super::patch::plain_slice::<f32>(t).unwrap().to_vec();
            // Equal as numbers (a zero's sign aside), in tract's order.
            prop_assert_eq!(values(&given), values(&ours), "{:?}", case);
        }
    }

    #[test]
    fn the_rule_takes_first_layers_and_large_stride_1_planes() {
        assert!(pays(3, 4800, [2, 2]));
        assert!(pays(16, 1024, [1, 1]));
        assert!(!pays(16, 256, [2, 2]));
        assert!(!pays(64, 64, [1, 1]));
    }
}
