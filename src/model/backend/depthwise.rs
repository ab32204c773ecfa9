//! Depthwise 2-D convolution (one 2-D filter per channel, f32) as our own
//! tract op, vectorised across channels.
//!
//! MobileNet-style models spend much of their time here. tract 0.23.9
//! walks each channel's plane along its rows: its AVX kernel needs a
//! stride-1 row of at least 8 outputs, so strided layers and the small
//! planes of the late layers (6×6, 3×3 in Visual Wake Words) run its
//! scalar loop. This op works channel-last instead: for every output point
//! and tap, one multiply-add over all channels, which the compiler
//! vectorises whatever the stride and plane size. Each output is the bias
//! plus `tap · input` for the taps inside the image, added in kernel order
//! with no fused multiply-add — tract's own arithmetic in tract's order, so
//! the answers are tract's, number for number (the tests hold it to that).

use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Below this many channels a vector over channels is too short to beat
/// tract's row kernel (measured on VWW's 8-channel first layer).
const MIN_CHANNELS: usize = 16;

/// Channels summed at once in registers: two AVX vectors, four SSE ones.
const LANES: usize = 16;

/// tract's AVX depthwise kernel takes stride-1 rows of at least 8 outputs.
const TRACT_ROW: usize = 8;

/// Above this many points per channel plane the copies to and from
/// channel-last cost more than they save: with no limit UltraFace's
/// 160×120 and 80×60 planes ran 1.6x slower; 1024 and 4096 measured the
/// same within noise, and 4096 also takes VWW's 48×48 strided layer.
const MAX_PLANE: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseConv {
    channels: usize,
    input_hw: [usize; 2],
    output_hw: [usize; 2],
    kernel_hw: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pad_before: [usize; 2],
    /// Tap-major, `[ky · kw + kx][channel]`.
    taps: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    /// The output's shape (`[1, C, H, W]` or `[C, H, W]`, as the input's).
    output_shape: TVec<usize>,
}

impl Eq for DepthwiseConv {}

impl DepthwiseConv {
    /// The op for a decluttered `Conv` node that is a depthwise f32
    /// convolution tract would run with its own depthwise op: channel-first
    /// data of batch 1, one filter per channel, constant kernel and bias,
    /// concrete shapes, at least [`MIN_CHANNELS`] channels.
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<DepthwiseConv>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let spec = &conv.pool_spec;
        let c = spec.input_channels;
        if conv.q_params.is_some()
            || conv.kernel_fmt != KernelFormat::OIHW
            || c < MIN_CHANNELS
            || conv.group != c
            || spec.output_channels != c
            || spec.kernel_shape.len() != 2
            || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let x = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        let hw: [usize; 2] = match (spec.data_format, shape) {
            (DataFormat::NCHW, &[1, ch, h, w]) | (DataFormat::CHW, &[ch, h, w]) if ch == c => {
                [h, w]
            }
            _ => return Ok(None),
        };
        if x.datum_type != f32::datum_type() {
            return Ok(None);
        }
        let kernel = model.outlet_fact(node.inputs[1])?;
        let bias = model.outlet_fact(node.inputs[2])?;
        let (Some(kernel), Some(bias)) = (&kernel.konst, &bias.konst) else {
            return Ok(None);
        };
        let [kh, kw] = [spec.kernel_shape[0], spec.kernel_shape[1]];
        if kernel.datum_type() != f32::datum_type()
            || kernel.shape() != [c, 1, kh, kw]
            || bias.datum_type() != f32::datum_type()
            || !(bias.len() == c || bias.len() == 1)
        {
            return Ok(None);
        }
        let kernel = super::plain_slice::<f32>(kernel)?;
        let mut taps = vec![0f32; kh * kw * c];
        for ch in 0..c {
            for t in 0..kh * kw {
                taps[t * c + ch] = kernel[ch * kh * kw + t];
            }
        }
        let bias = super::plain_slice::<f32>(bias)?;
        let bias: Vec<f32> = (0..c).map(|ch| bias[ch.min(bias.len() - 1)]).collect();
        let padding = spec.computed_padding(&hw);
        let strides = spec.strides();
        let dilations = spec.dilations();
        let output_hw = [padding[0].convoluted, padding[1].convoluted];
        let mut output_shape: TVec<usize> = shape.into();
        let r = output_shape.len();
        output_shape[r - 2] = output_hw[0];
        output_shape[r - 1] = output_hw[1];
        Ok(Some(DepthwiseConv {
            channels: c,
            input_hw: hw,
            output_hw,
            kernel_hw: [kh, kw],
            strides: [strides[0], strides[1]],
            dilations: [dilations[0], dilations[1]],
            pad_before: [padding[0].pad_before, padding[1].pad_before],
            taps: Arc::new(taps),
            bias: Arc::new(bias),
            output_shape,
        }))
    }

    /// Whether it beats tract's own op (measured on x86-64, see README):
    /// not where tract's row kernel runs vectorised, nor on planes so large
    /// that the channel-last copies cost more than they save.
    fn pays(&self) -> bool {
        let tract_vectorises = self.strides[1] == 1 && self.output_hw[1] >= TRACT_ROW;
        !tract_vectorises && self.input_hw[0] * self.input_hw[1] <= MAX_PLANE
    }

    /// Where tap `k` of output coordinate `o` reads along an axis, if
    /// inside the input.
    fn source(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        (o * self.strides[axis] + k * self.dilations[axis])
            .checked_sub(self.pad_before[axis])
            .filter(|i| *i < self.input_hw[axis])
    }

    /// The convolution of one CHW input, 8 lanes wide where the CPU has
    /// AVX (the x86-64 baseline the binary is built for has 4), else 4.
    /// Lane width changes no answer: each lane adds in the same order.
    #[allow(unsafe_code)]
    fn run(&self, x: &[f32]) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: `run_avx` needs AVX, which the CPU was just seen to have.
            return unsafe { self.run_avx(x) };
        }
        self.run_portable(x)
    }

    /// [`run_portable`](Self::run_portable) compiled for AVX.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    fn run_avx(&self, x: &[f32]) -> Vec<f32> {
        self.run_portable(x)
    }

    #[inline(always)]
    fn run_portable(&self, x: &[f32]) -> Vec<f32> {
        let c = self.channels;
        let [h, w] = self.input_hw;
        let [oh, ow] = self.output_hw;
        let [kh, kw] = self.kernel_hw;
        // Channel-last copies in and out.
        let mut xt = vec![0f32; h * w * c];
        for (ch, plane) in x.chunks_exact(h * w).enumerate() {
            for (p, v) in plane.iter().enumerate() {
                xt[p * c + ch] = *v;
            }
        }
        let mut yt = vec![0f32; oh * ow * c];
        // Per output point: where each tap inside the image reads (tap
        // offset, input offset), then each block of LANES channels summed in
        // registers over those taps, and the channels left over one by one.
        let mut reads: Vec<(usize, usize)> = Vec::with_capacity(kh * kw);
        let blocked = c - c % LANES;
        for oy in 0..oh {
            for ox in 0..ow {
                reads.clear();
                for ky in 0..kh {
                    let Some(iy) = self.source(0, oy, ky) else {
                        continue;
                    };
                    for kx in 0..kw {
                        if let Some(ix) = self.source(1, ox, kx) {
                            reads.push(((ky * kw + kx) * c, (iy * w + ix) * c));
                        }
                    }
                }
                let out = &mut yt[(oy * ow + ox) * c..][..c];
                for base in (0..blocked).step_by(LANES) {
                    let mut acc: [f32; LANES] = self.bias[base..base + LANES]
                        .try_into()
                        .expect("a block is LANES wide");
                    for &(t, i) in &reads {
                        let tap = &self.taps[t + base..][..LANES];
                        let input = &xt[i + base..][..LANES];
                        for ((a, t), v) in acc.iter_mut().zip(tap).zip(input) {
                            *a += *t * *v;
                        }
                    }
                    out[base..base + LANES].copy_from_slice(&acc);
                }
                for ch in blocked..c {
                    let mut acc = self.bias[ch];
                    for &(t, i) in &reads {
                        acc += self.taps[t + ch] * xt[i + ch];
                    }
                    out[ch] = acc;
                }
            }
        }
        let mut y = vec![0f32; c * oh * ow];
        for (p, point) in yt.chunks_exact(c).enumerate() {
            for (ch, v) in point.iter().enumerate() {
                y[ch * oh * ow + p] = *v;
            }
        }
        y
    }
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "DepthwiseConvChannelLast".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels, {:?} → {:?}, kernel {:?}, strides {:?}",
            self.channels, self.input_hw, self.output_hw, self.kernel_hw, self.strides
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = super::plain_slice::<f32>(&inputs[0])?;
        let [h, w] = self.input_hw;
        ensure!(
            x.len() == self.channels * h * w,
            "depthwise input of {} values",
            x.len()
        );
        let y = tract_ndarray::ArrayD::from_shape_vec(&*self.output_shape, self.run(x))?;
        Ok(tvec!(Tensor::from(y).into_tvalue()))
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Replaces each depthwise convolution of a decluttered `model` where
/// [`DepthwiseConv`] is the faster; returns how many. x86-64 only: there
/// tract adds without fused multiply-adds and the answers are equal; its
/// AArch64 kernel rounds differently (outputs one ulp apart under
/// qemu-aarch64), and the rule was measured on x86-64 alone.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    if cfg!(target_arch = "x86_64") {
        substitute_where(model, DepthwiseConv::pays)
    } else {
        Ok(0)
    }
}

fn substitute_where(
    model: &mut TypedModel,
    wanted: impl Fn(&DepthwiseConv) -> bool,
) -> TractResult<usize> {
    let mut found = Vec::new();
    for node in model.nodes() {
        if let Some(op) = DepthwiseConv::of(model, node)?.filter(|op| wanted(op)) {
            found.push((node.id, op));
        }
    }
    for (id, op) in &found {
        super::tract::replace_with(model, *id, *id, op.clone())?;
    }
    if !found.is_empty() {
        model.compact()?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
    use tract_onnx::pb::{
        attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, ModelProto,
        NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    };

    #[derive(Debug, Clone)]
    struct Case {
        channels: usize,
        group: usize,
        hw: [usize; 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        /// top, left, bottom, right
        pads: [usize; 4],
        bias: bool,
    }

    fn ints(name: &str, v: &[usize]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.iter().map(|x| *x as i64).collect(),
            ..Default::default()
        }
    }

    fn info(name: &str, dims: &[usize]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                value: Some(dimension::Value::DimValue(*d as i64)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One Conv over a `[1, C, H, W]` input, weights from a seeded generator.
    fn model(case: &Case) -> ModelProto {
        let mut rng = fastrand::Rng::with_seed(case.channels as u64 * 31 + case.hw[0] as u64);
        let [kh, kw] = case.kernel;
        let per_group = case.channels / case.group;
        let weights = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![case.channels as i64, per_group as i64, kh as i64, kw as i64],
            float_data: (0..case.channels * per_group * kh * kw)
                .map(|_| rng.f32() * 2.0 - 1.0)
                .collect(),
            ..Default::default()
        };
        let bias = TensorProto {
            name: "b".into(),
            data_type: DataType::Float as i32,
            dims: vec![case.channels as i64],
            float_data: (0..case.channels).map(|_| rng.f32() - 0.5).collect(),
            ..Default::default()
        };
        let [pt, pl, pb, pr] = case.pads;
        let mut inputs = vec!["x".to_string(), "w".to_string()];
        let mut initializer = vec![weights];
        if case.bias {
            inputs.push("b".into());
            initializer.push(bias);
        }
        let conv = NodeProto {
            op_type: "Conv".into(),
            name: "dw".into(),
            input: inputs,
            output: vec!["y".into()],
            attribute: vec![
                AttributeProto {
                    name: "group".into(),
                    r#type: AttributeType::Int as i32,
                    i: case.group as i64,
                    ..Default::default()
                },
                ints("kernel_shape", &case.kernel),
                ints("strides", &case.strides),
                ints("dilations", &case.dilations),
                ints("pads", &[pt, pl, pb, pr]),
            ],
            ..Default::default()
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                name: "dw".into(),
                node: vec![conv],
                initializer,
                input: vec![info("x", &[1, case.channels, case.hw[0], case.hw[1]])],
                output: vec![ValueInfoProto {
                    name: "y".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn decluttered(case: &Case) -> TypedModel {
        tract_onnx::onnx()
            .model_for_proto_model(&model(case))
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap()
    }

    /// tract's plan and ours (every depthwise convolution [`DepthwiseConv`]
    /// can take, whether it pays or not) on one random input:
    /// (substituted, tract's output, ours).
    fn both(case: &Case) -> (usize, Vec<f32>, Vec<f32>) {
        let typed = decluttered(case);
        let mut ours = typed.clone();
        let n = substitute_where(&mut ours, |_| true).unwrap();
        let given = typed.into_optimized().unwrap().into_runnable().unwrap();
        let ours = ours.into_optimized().unwrap().into_runnable().unwrap();
        let [h, w] = case.hw;
        let mut rng = fastrand::Rng::with_seed(11);
        let x: Vec<f32> = (0..case.channels * h * w)
            .map(|_| rng.f32() * 8.0 - 4.0)
            .collect();
        let x = Tensor::from_shape(&[1, case.channels, h, w], &x).unwrap();
        let run = |plan: &Arc<TypedRunnableModel>| {
            let y = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
            super::super::plain_slice::<f32>(&y[0]).unwrap().to_vec()
        };
        (n, run(&given), run(&ours))
    }

    fn cases() -> impl Strategy<Value = Case> {
        (
            (MIN_CHANNELS..48, 1usize..14, 1usize..14),
            (1usize..6, 1usize..6, 1usize..4, 1usize..4),
            (
                1usize..3,
                1usize..3,
                [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            ),
            any::<bool>(),
        )
            .prop_map(|((c, h, w), (kh, kw, sh, sw), (dh, dw, pads), bias)| Case {
                channels: c,
                group: c,
                hw: [h, w],
                kernel: [kh, kw],
                strides: [sh, sw],
                dilations: [dh, dw],
                pads,
                bias,
            })
            .prop_filter("an output at least 1×1", |c| {
                (0..2).all(|a| {
                    c.hw[a] + c.pads[a] + c.pads[a + 2] > c.dilations[a] * (c.kernel[a] - 1)
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_same_answers_as_tracts_depthwise(case in cases()) {
            let (n, given, ours) = both(&case);
            prop_assert_eq!(n, 1);
            // Equal as numbers (a zero's sign aside), in tract's own order;
            // on other CPUs tract's own kernel rounds differently.
            if cfg!(target_arch = "x86_64") {
                prop_assert_eq!(given, ours, "{:?}", case);
            } else {
                for (a, b) in given.iter().zip(&ours) {
                    prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{} vs {} {:?}", a, b, case);
                }
            }
        }
    }

    #[test]
    fn grouped_narrow_and_wide_convolutions_stay_tracts() {
        let base = Case {
            channels: 32,
            group: 32,
            hw: [8, 8],
            kernel: [3, 3],
            strides: [2, 2],
            dilations: [1, 1],
            pads: [1, 1, 1, 1],
            bias: true,
        };
        let (n, given, ours) = both(&base);
        assert_eq!((n, given == ours), (1, true));
        let grouped = Case {
            group: 8,
            ..base.clone()
        };
        assert_eq!(both(&grouped).0, 0);
        let narrow = Case {
            channels: 8,
            group: 8,
            ..base.clone()
        };
        assert_eq!(both(&narrow).0, 0);

        // Where it pays: strided or short rows, small planes.
        let pays = |case: &Case| {
            let typed = decluttered(case);
            let conv = typed.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap();
            DepthwiseConv::of(&typed, conv).unwrap().unwrap().pays()
        };
        assert!(pays(&base));
        let stride_one = Case {
            strides: [1, 1],
            hw: [6, 6],
            ..base.clone()
        };
        assert!(pays(&stride_one), "6 outputs a row: tract's loop is scalar");
        let wide = Case {
            hw: [8, 12],
            ..stride_one
        };
        assert!(!pays(&wide), "12 outputs a row: tract's kernel vectorises");
        let large = Case {
            hw: [80, 80],
            ..base
        };
        assert!(!pays(&large), "6400 points a plane");
    }
}
