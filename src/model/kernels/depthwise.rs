//! Depthwise 2-D convolution (one 2-D filter per channel, f32) as our own
//! tract op, in one of two layouts chosen per layer.
//!
//! MobileNet-style models spend much of their time here. tract 0.23.9
//! walks each channel's plane along its rows: its AVX kernel needs a
//! stride-1 row of at least 8 outputs, so strided layers and the small
//! planes of the late layers (6×6, 3×3 in Visual Wake Words) run its
//! scalar loop; its vectorised rows were slower than the plane layout
//! below on VWW's 24×24 layer, and it has no channel-inner kernel on
//! x86-64 for channel-last data (README, "Depthwise in two layouts").
//!
//! - [`Layout::ChannelLast`], for small planes of many channels: for
//!   every output point and tap, one multiply-add over all channels, which
//!   the compiler vectorises whatever the stride and plane size; the
//!   copies to and from channel-last are the price, none when the data is
//!   channel-last already or can be made so: [`substitute`] first moves the
//!   channel axis last around such a layer — and around a strided or
//!   short-row layer of any plane size, which tract's row kernel runs
//!   scalar — through tract's own axis changes, wherever the ops up to the
//!   neighbouring 1×1 convolutions accept it.
//! - [`Layout::Planes`], for the other stride-1 layers: each channel's
//!   plane is copied once into a zero-padded plane, and then every tap is
//!   one long contiguous multiply-add over the output plane, read at a
//!   constant offset. The output is computed on the padded width and the
//!   extra columns dropped. Strided layers work too — the input is split
//!   by stride phase, so that for stride 2 the even and odd columns (and
//!   rows) are planes of their own — and are tested, but [`choose`]
//!   leaves them to channel-last or tract: on x86-64 the split cost what
//!   it saved.
//!
//! [`choose`]: DepthwiseConv::choose
//!
//! Each output is the bias plus `tap · input` over the kernel in kernel
//! order with no fused multiply-add — tract's own arithmetic in tract's
//! order (a tap over the padding adds a zero), so the answers are
//! tract's, number for number (the tests hold both layouts to that).
//!
//! A per-channel `Mul` or `Add` right after the layer (a batch
//! normalisation tract left unfolded, as in UltraFace) becomes a step of
//! the op, applied to its outputs with the same one operation per value:
//! on channel-last data tract runs such a node with its generic
//! broadcasting, which cost more than the convolution.

use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Below this many channels a vector over channels is too short to beat
/// the per-plane layout (measured on VWW's 8-channel first layer).
const MIN_CHANNELS: usize = 16;

/// Channels summed at once in registers: two AVX vectors, four SSE ones.
const LANES: usize = 16;

/// tract's AVX depthwise kernel takes stride-1 rows of at least 8 outputs.
const TRACT_ROW: usize = 8;

/// Above this many points per channel plane tract's own op is the faster
/// on channel-first data: with no limit, channel-last ran UltraFace's
/// 160×120 and 80×60 planes 1.6× slower (the copies to and from
/// channel-last), planes its stride-1 160×120 layer 1.5–2× slower. With
/// the channel axis moved (no copies) the limit does not apply.
const MAX_PLANE: usize = 4096;

/// Outputs of one plane summed over every tap before the next ones, so
/// that the sums and the inputs they read stay in the L1 cache.
const CHUNK: usize = 1024;

/// How [`DepthwiseConv`] lays out its work (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    ChannelLast,
    Planes,
}

/// An element-wise step by a per-channel constant that the op applies
/// to its outputs, in place of the `Mul` or `Add` node that followed it
/// (a batch normalisation tract did not fold into the kernel). The same
/// one IEEE operation per value as tract's node, so the same answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Mul,
    Add,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseConv {
    channels: usize,
    input_hw: [usize; 2],
    output_hw: [usize; 2],
    kernel_hw: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pad_before: [usize; 2],
    /// The data is `[1, H, W, C]` or `[H, W, C]` (else channel-first).
    channels_last_data: bool,
    layout: Layout,
    /// Tap-major, `[ky · kw + kx][channel]`.
    taps: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    /// Per-channel steps on the outputs, in order (see [`absorb_steps`]).
    steps: Arc<Vec<(Step, Vec<f32>)>>,
    /// The output's shape (`[1, C, H, W]`, `[C, H, W]`, `[1, H, W, C]` or
    /// `[H, W, C]`, as the input's).
    output_shape: TVec<usize>,
}

impl Eq for DepthwiseConv {}

impl DepthwiseConv {
    /// The op for a decluttered `Conv` node that is a depthwise f32
    /// convolution tract would run with its own depthwise op: data of
    /// batch 1 (channel-first or channel-last), two or more channels with
    /// one filter each, constant finite kernel and bias, concrete shapes.
    /// Its layout is [`Layout::ChannelLast`] until
    /// [`with_layout`](Self::with_layout) sets the one
    /// [`choose`](Self::choose) picked.
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<DepthwiseConv>> {
        let Some(facts) = super::patch::ConvFacts::of(model, node)? else {
            return Ok(None);
        };
        let spec = &facts.conv.pool_spec;
        let c = spec.input_channels;
        // One channel is a plain convolution to tract (im2col and a
        // matrix product, another order of sums).
        if c < 2 || facts.conv.group != c || spec.output_channels != c {
            return Ok(None);
        }
        let [kh, kw] = facts.kernel_hw;
        let (hw, channels_last_data, kernel) = (facts.hw, facts.channels_last, facts.kernel);
        let mut taps = vec![0f32; kh * kw * c];
        for ch in 0..c {
            for t in 0..kh * kw {
                taps[t * c + ch] = kernel[ch * kh * kw + t];
            }
        }
        let output_hw = facts.output_hw;
        let mut output_shape: TVec<usize> = facts.shape.into();
        let r = output_shape.len();
        let h_axis = if channels_last_data { r - 3 } else { r - 2 };
        output_shape[h_axis] = output_hw[0];
        output_shape[h_axis + 1] = output_hw[1];
        Ok(Some(DepthwiseConv {
            channels: c,
            input_hw: hw,
            output_hw,
            kernel_hw: [kh, kw],
            strides: facts.strides,
            dilations: facts.dilations,
            pad_before: facts.pad_before,
            channels_last_data,
            layout: Layout::ChannelLast,
            taps: Arc::new(taps),
            bias: Arc::new(facts.bias),
            steps: Arc::default(),
            output_shape,
        }))
    }

    /// The layout that beats tract's own op here, if one does (measured
    /// on x86-64 with `--profile`, see README): channel-last for small
    /// planes of 16+ channels where tract's row kernel runs scalar, and for
    /// channel-last data of 16+ channels (no copies then); planes for
    /// stride-1 layers up to [`MAX_PLANE`] points otherwise; tract's op
    /// for the rest (its vectorised rows on large planes, and large strided
    /// planes, where splitting the input by stride phase cost more than it
    /// saved: UltraFace's 160×120 layers ran 1.1–2× slower in planes).
    fn choose(&self) -> Option<Layout> {
        let tract_vectorises = self.strides[1] == 1 && self.output_hw[1] >= TRACT_ROW;
        let small = self.input_hw[0] * self.input_hw[1] <= MAX_PLANE;
        let many = self.channels >= MIN_CHANNELS;
        if many && (self.channels_last_data || (!tract_vectorises && small)) {
            Some(Layout::ChannelLast)
        } else if self.strides == [1, 1] && small {
            Some(Layout::Planes)
        } else {
            None
        }
    }

    fn with_layout(self, layout: Layout) -> DepthwiseConv {
        DepthwiseConv { layout, ..self }
    }

    /// Whether moving the channel axis last pays here: channel-last data
    /// makes [`choose`](Self::choose) pick [`Layout::ChannelLast`] (with no
    /// copies) for any plane size, which beats tract's op wherever its row
    /// kernel runs scalar — strided layers and short rows — large planes
    /// included (UltraFace's strided 160×120 layer, README "Depthwise").
    fn wants_channel_last(&self) -> bool {
        let tract_vectorises = self.strides[1] == 1 && self.output_hw[1] >= TRACT_ROW;
        !self.channels_last_data && self.channels >= MIN_CHANNELS && !tract_vectorises
    }

    /// The values of `konst` per output channel, when it is a constant
    /// that `Mul` or `Add` would broadcast along the channel axis alone (or
    /// a single value) without changing the output's shape.
    fn per_channel(&self, konst: &Tensor) -> TractResult<Option<Vec<f32>>> {
        let shape = konst.shape();
        let rank = self.output_shape.len();
        if konst.datum_type() != f32::datum_type() || shape.len() > rank {
            return Ok(None);
        }
        let channel_axis = if self.channels_last_data {
            rank - 1
        } else {
            rank - 3
        };
        let offset = rank - shape.len();
        let along_channels = shape
            .iter()
            .enumerate()
            .all(|(axis, &d)| d == 1 || (axis + offset == channel_axis && d == self.channels));
        if !along_channels {
            return Ok(None);
        }
        let values = super::patch::plain_slice::<f32>(konst)?;
        Ok(Some(if values.len() == 1 {
            vec![values[0]; self.channels]
        } else {
            values.to_vec()
        }))
    }

    fn with_step(&self, step: Step, values: Vec<f32>) -> DepthwiseConv {
        let mut steps = (*self.steps).clone();
        steps.push((step, values));
        DepthwiseConv {
            steps: Arc::new(steps),
            ..self.clone()
        }
    }

    /// Applies [`steps`](Self::steps) to the output `y`, in its layout.
    #[inline(always)]
    fn apply_steps(&self, y: &mut [f32]) {
        let points = self.output_hw[0] * self.output_hw[1];
        for (step, values) in self.steps.iter() {
            if self.channels_last_data {
                for point in y.chunks_exact_mut(self.channels) {
                    for (v, k) in point.iter_mut().zip(values) {
                        match step {
                            Step::Mul => *v *= *k,
                            Step::Add => *v += *k,
                        }
                    }
                }
            } else {
                for (plane, k) in y.chunks_exact_mut(points).zip(values) {
                    match step {
                        Step::Mul => plane.iter_mut().for_each(|v| *v *= *k),
                        Step::Add => plane.iter_mut().for_each(|v| *v += *k),
                    }
                }
            }
        }
    }

    /// Rows and columns of each stride-phase plane in [`Layout::Planes`]:
    /// enough for every input point (after the padding before it) and for
    /// every read an output makes.
    fn phase_hw(&self) -> [usize; 2] {
        std::array::from_fn(|a| {
            let [s, d] = [self.strides[a], self.dilations[a]];
            let holds = (self.pad_before[a] + self.input_hw[a]).div_ceil(s);
            let reads = self.output_hw[a] + (self.kernel_hw[a] - 1) * d / s;
            holds.max(reads)
        })
    }

    /// Where tap `k` of output coordinate `o` reads along an axis, if
    /// inside the input.
    fn source(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        (o * self.strides[axis] + k * self.dilations[axis])
            .checked_sub(self.pad_before[axis])
            .filter(|i| *i < self.input_hw[axis])
    }

    /// The convolution of one CHW input, 16 lanes wide where the CPU has
    /// AVX-512, 8 where it has AVX (the x86-64 baseline the binary is built
    /// for has 4), else 4. Lane width changes no answer: each lane adds in
    /// the same order, and no multiply-add is fused at any width.
    /// Writes every value of `y`, the output in the data's layout.
    #[allow(unsafe_code)]
    fn run(&self, x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match super::x86::widest() {
            // SAFETY: each needs the instructions `widest` just saw the CPU has.
            super::x86::Width::Avx512 => return unsafe { self.run_avx512(x, y) },
            super::x86::Width::Avx => return unsafe { self.run_avx(x, y) },
            super::x86::Width::Baseline => {}
        }
        self.run_portable(x, y)
    }

    /// [`run_portable`](Self::run_portable) compiled for AVX.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    fn run_avx(&self, x: &[f32], y: &mut [f32]) {
        self.run_portable(x, y)
    }

    /// [`run_portable`](Self::run_portable) compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn run_avx512(&self, x: &[f32], y: &mut [f32]) {
        self.run_portable(x, y)
    }

    #[inline(always)]
    fn run_portable(&self, x: &[f32], y: &mut [f32]) {
        self.convolve(x, y);
        self.apply_steps(y);
    }

    #[inline(always)]
    fn convolve(&self, x: &[f32], y: &mut [f32]) {
        let c = self.channels;
        let points = self.input_hw[0] * self.input_hw[1];
        let out = self.output_hw[0] * self.output_hw[1];
        match (self.layout, self.channels_last_data) {
            (Layout::ChannelLast, true) => self.run_channel_last(x, y),
            (Layout::ChannelLast, false) => {
                let mut yt = vec![0f32; y.len()];
                self.run_channel_last(&super::patch::transposed(x, c, points), &mut yt);
                super::patch::transpose_into(&yt, out, c, y);
            }
            (Layout::Planes, false) => self.run_planes(x, y),
            (Layout::Planes, true) => {
                let mut yp = vec![0f32; y.len()];
                self.run_planes(&super::patch::transposed(x, points, c), &mut yp);
                super::patch::transpose_into(&yp, c, out, y);
            }
        }
    }

    #[inline(always)]
    fn run_planes(&self, x: &[f32], y: &mut [f32]) {
        let [h, w] = self.input_hw;
        let [oh, ow] = self.output_hw;
        let [kh, kw] = self.kernel_hw;
        let [sy, sx] = self.strides;
        let [dy, dx] = self.dilations;
        let [pt, pl] = self.pad_before;
        let [ph, pw] = self.phase_hw();
        // The last output row reads up to this far past its phase plane.
        let plane = ph * pw + (kw - 1) * dx / sx;
        // Every channel writes the same points; the padding stays zero.
        let mut phases = vec![0f32; sy * sx * plane];
        // Where each tap reads, in kernel order: its phase plane, shifted.
        let reads: Vec<usize> = (0..kh * kw)
            .map(|t| {
                let [ry, rx] = [t / kw * dy, t % kw * dx];
                let phase = (ry % sy) * sx + rx % sx;
                phase * plane + ry / sy * pw + rx / sx
            })
            .collect();
        let n = oh * pw;
        let mut acc = vec![0f32; n];
        // Where each input row starts in its row phase, and for each column
        // phase the first input column it takes and where that lands:
        // computed once, not per channel (in a micro-benchmark the
        // divisions were most of a strided layer's time).
        let rows: Vec<usize> = (0..h)
            .map(|iy| {
                let py = iy + pt;
                (py % sy) * sx * plane + py / sy * pw
            })
            .collect();
        let columns: Vec<(usize, usize)> = (0..sx)
            .filter_map(|q| {
                let first = (q + sx - pl % sx) % sx;
                (first < w).then_some((first, q * plane + (first + pl) / sx))
            })
            .collect();
        let channels = x.chunks_exact(h * w).zip(y.chunks_exact_mut(oh * ow));
        for (ch, (input, output)) in channels.enumerate() {
            for (row, base) in input.chunks_exact(w).zip(&rows) {
                if sx == 1 {
                    phases[base + pl..][..w].copy_from_slice(row);
                    continue;
                }
                for &(first, at) in &columns {
                    let to = &mut phases[base + at..];
                    for (t, v) in to.iter_mut().zip(row[first..].iter().step_by(sx)) {
                        *t = *v;
                    }
                }
            }
            let kernel = self.taps[ch..].iter().step_by(self.channels);
            for (start, acc) in (0..n).step_by(CHUNK).zip(acc.chunks_mut(CHUNK)) {
                acc.fill(self.bias[ch]);
                for (tap, at) in kernel.clone().zip(&reads) {
                    for (a, v) in acc.iter_mut().zip(&phases[at + start..]) {
                        *a += *tap * *v;
                    }
                }
            }
            for (out, wide) in output.chunks_exact_mut(ow).zip(acc.chunks_exact(pw)) {
                out.copy_from_slice(&wide[..ow]);
            }
        }
    }

    #[inline(always)]
    fn run_channel_last(&self, xt: &[f32], yt: &mut [f32]) {
        let c = self.channels;
        let w = self.input_hw[1];
        let [oh, ow] = self.output_hw;
        let [kh, kw] = self.kernel_hw;
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
                // Widest blocks first: their lanes are independent sums, so
                // four vectors' worth keep the adder busy where one block's
                // chain of taps would wait on each add in turn.
                let mut base = 0;
                while base + 4 * LANES <= blocked {
                    self.block::<{ 4 * LANES }>(&reads, xt, base, out);
                    base += 4 * LANES;
                }
                if base + 2 * LANES <= blocked {
                    self.block::<{ 2 * LANES }>(&reads, xt, base, out);
                    base += 2 * LANES;
                }
                if base < blocked {
                    self.block::<LANES>(&reads, xt, base, out);
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
    }

    /// Channels `base..base + N` of one output point, summed in registers
    /// over `reads` (tap offset, input offset) in kernel order.
    #[inline(always)]
    fn block<const N: usize>(
        &self,
        reads: &[(usize, usize)],
        xt: &[f32],
        base: usize,
        out: &mut [f32],
    ) {
        let mut acc: [f32; N] = self.bias[base..base + N]
            .try_into()
            .expect("a block is N wide");
        for &(t, i) in reads {
            let tap = &self.taps[t + base..][..N];
            let input = &xt[i + base..][..N];
            for ((a, t), v) in acc.iter_mut().zip(tap).zip(input) {
                *a += *t * *v;
            }
        }
        out[base..base + N].copy_from_slice(&acc);
    }
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        match self.layout {
            Layout::ChannelLast => "OurDepthwiseChannelLast".into(),
            Layout::Planes => "OurDepthwisePlanes".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let steps: Vec<String> = self.steps.iter().map(|(s, _)| format!("{s:?}")).collect();
        Ok(vec![format!(
            "{:?}, {} channels {}, {:?} → {:?}, kernel {:?}, strides {:?}, then {:?}",
            self.layout,
            self.channels,
            if self.channels_last_data {
                "last"
            } else {
                "first"
            },
            self.input_hw,
            self.output_hw,
            self.kernel_hw,
            self.strides,
            steps
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [h, w] = self.input_hw;
        let len = self.channels * h * w;
        super::patch::eval_f32("depthwise", &inputs[0], len, &self.output_shape, |x, y| {
            self.run(x, y)
        })
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Replaces each depthwise convolution of a decluttered `model` where
/// [`DepthwiseConv`] is the faster, and folds in the per-channel steps
/// after it; returns how many of each. x86-64 only: there
/// tract adds without fused multiply-adds and the answers are equal; its
/// AArch64 kernel rounds differently (outputs one ulp apart under
/// qemu-aarch64), and the rule was measured on x86-64 alone.
pub fn substitute(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    if cfg!(target_arch = "x86_64") {
        to_channel_last(model)?;
        let replaced = substitute_where(model, DepthwiseConv::choose)?;
        Ok((replaced, absorb_steps(model)?))
    } else {
        Ok((0, 0))
    }
}

/// Moves the channel axis last around each depthwise layer that
/// [`Layout::ChannelLast`] would otherwise run between two copies, so that
/// it runs without them; returns how many moves were made. The move is
/// tract's own axis change (the one its AArch64 build makes for its
/// channel-inner kernel): the ops on the way are rewritten for the new
/// layout, and a matrix product (a 1×1 convolution, as tract declutters
/// it) reads and writes either layout, so a move ends at the neighbouring
/// pointwise layers. A move that an op refuses, or that would reach the
/// graph's inputs or outputs, is not made. The answers stay tract's (the
/// tests compare them number for number).
fn to_channel_last(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::change_axes::AxisChange;
    let mut tried = std::collections::HashSet::new();
    let mut moved = 0;
    loop {
        let mut candidate = None;
        for node in model.eval_order()? {
            let node = model.node(node);
            if tried.contains(&node.name) {
                continue;
            }
            let Some(op) = DepthwiseConv::of(model, node)? else {
                continue;
            };
            if op.wants_channel_last() {
                let rank = op.output_shape.len();
                candidate = Some((node.name.clone(), node.inputs[0], rank));
                break;
            }
        }
        let Some((name, input, rank)) = candidate else {
            break;
        };
        tried.insert(name);
        let change = AxisChange {
            outlet: input,
            op: AxisOp::Move(rank - 3, rank - 1),
        };
        let mut locked = model.output_outlets()?.to_vec();
        locked.extend(model.input_outlets()?.iter());
        let mut explored = Default::default();
        let patch = tract_onnx::tract_core::optim::change_axes::change_axes(
            model,
            &change,
            &locked,
            &[],
            &mut explored,
        );
        // A move tract cannot make leaves the model as it was: the layer
        // then runs with its copies.
        let Ok(Some((patch, _))) = patch else {
            continue;
        };
        let mut changed = model.clone();
        if patch.apply(&mut changed).is_ok() && changed.compact().is_ok() {
            *model = changed;
            moved += 1;
        }
    }
    Ok(moved)
}

/// Folds into each of our depthwise ops the per-channel `Mul` and `Add`
/// nodes that follow it alone (a batch normalisation left after the
/// convolution: on channel-last data tract runs such a node with its
/// generic broadcasting, 0.4–0.6 ms on UltraFace's 80×60 planes); returns
/// how many.
fn absorb_steps(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::math::{Add, Mul};
    let mut absorbed = 0;
    loop {
        let outputs = model.output_outlets()?.to_vec();
        let mut found = None;
        for node in model.nodes() {
            let Some(op) = node.op_as::<DepthwiseConv>() else {
                continue;
            };
            let [next] = &*node.outputs[0].successors else {
                continue;
            };
            if outputs.contains(&OutletId::new(node.id, 0)) {
                continue;
            }
            let then = model.node(next.node);
            let Some(bin) = then.op_as::<TypedBinOp>() else {
                continue;
            };
            let step = if bin.0.is::<Mul>() {
                Step::Mul
            } else if bin.0.is::<Add>() {
                Step::Add
            } else {
                continue;
            };
            if bin.1.is_some() || then.inputs.len() != 2 {
                continue;
            }
            let other = model.outlet_fact(then.inputs[1 - next.slot])?;
            let Some(konst) = &other.konst else {
                continue;
            };
            if let Some(values) = op.per_channel(konst)? {
                found = Some((node.id, then.id, op.with_step(step, values)));
                break;
            }
        }
        let Some((ours, then, op)) = found else {
            break;
        };
        super::patch::replace_with(model, ours, then, op)?;
        model.compact()?;
        absorbed += 1;
    }
    Ok(absorbed)
}

fn substitute_where(
    model: &mut TypedModel,
    choose: impl Fn(&DepthwiseConv) -> Option<Layout>,
) -> TractResult<usize> {
    super::patch::substitute_each(model, |model, node| {
        let op = DepthwiseConv::of(model, node)?;
        Ok(op.and_then(|op| choose(&op).map(|layout| op.with_layout(layout))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_graphs::{self, ints};
    use proptest::prelude::*;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::{
        attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto, TensorProto,
    };
    use tract_onnx::tract_core::ops::cnn::Conv;

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
        /// The graph's input and output are `[1, H, W, C]`, transposed
        /// around the Conv (tract folds both into a channel-last Conv).
        nhwc: bool,
        /// A per-channel Mul and Add (a batch normalisation) after the
        /// Conv.
        steps: bool,
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
        if case.nhwc {
            inputs[0] = "x_nchw".into();
        }
        let transpose = NodeProto {
            op_type: "Transpose".into(),
            name: "to_nchw".into(),
            input: vec!["x".into()],
            output: vec!["x_nchw".into()],
            attribute: vec![ints("perm", &[0, 3, 1, 2])],
            ..Default::default()
        };
        let back = NodeProto {
            op_type: "Transpose".into(),
            name: "to_nhwc".into(),
            input: vec!["y_nchw".into()],
            output: vec!["y".into()],
            attribute: vec![ints("perm", &[0, 2, 3, 1])],
            ..Default::default()
        };
        let out = if case.nhwc { "y_nchw" } else { "y" };
        let per_channel = |name: &str, rng: &mut fastrand::Rng| TensorProto {
            name: name.into(),
            data_type: DataType::Float as i32,
            dims: vec![case.channels as i64, 1, 1],
            float_data: (0..case.channels).map(|_| rng.f32() * 2.0 - 1.0).collect(),
            ..Default::default()
        };
        let mut steps = vec![];
        if case.steps {
            initializer.push(per_channel("scale", &mut rng));
            initializer.push(per_channel("shift", &mut rng));
            steps.push(test_graphs::node(
                "Mul",
                &["conv", "scale"],
                "scaled",
                vec![],
            ));
            steps.push(test_graphs::node("Add", &["scaled", "shift"], out, vec![]));
        }
        let conv = NodeProto {
            op_type: "Conv".into(),
            name: "dw".into(),
            input: inputs,
            output: vec![if case.steps { "conv" } else { out }.into()],
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
        test_graphs::model(
            "dw",
            if case.nhwc {
                [vec![transpose, conv], steps, vec![back]].concat()
            } else {
                [vec![conv], steps].concat()
            },
            initializer,
            vec![test_graphs::float_value("x", &input_shape(case))],
            vec![test_graphs::untyped_value("y")],
        )
    }

    fn input_shape(case: &Case) -> [usize; 4] {
        let [h, w] = case.hw;
        if case.nhwc {
            [1, h, w, case.channels]
        } else {
            [1, case.channels, h, w]
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
    /// can take, in `layout`, whether it pays or not, with the case's
    /// per-channel steps folded in) on one random input: (substituted,
    /// tract's output, ours).
    fn both(case: &Case, layout: Layout) -> (usize, Vec<f32>, Vec<f32>) {
        let typed = decluttered(case);
        let conv = typed.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap();
        let format = conv.op_as::<Conv>().unwrap().pool_spec.data_format;
        assert_eq!(format.c_is_last(), case.nhwc, "{format:?}");
        let mut ours = typed.clone();
        let n = substitute_where(&mut ours, |_| Some(layout)).unwrap();
        let absorbed = absorb_steps(&mut ours).unwrap();
        assert_eq!(absorbed, if case.steps { 2 * n } else { 0 }, "{case:?}");
        let given = typed.into_optimized().unwrap().into_runnable().unwrap();
        let ours = ours.into_optimized().unwrap().into_runnable().unwrap();
        let [h, w] = case.hw;
        let mut rng = fastrand::Rng::with_seed(11);
        let x: Vec<f32> = (0..case.channels * h * w)
            .map(|_| rng.f32() * 8.0 - 4.0)
            .collect();
        let x = Tensor::from_shape(&input_shape(case), &x).unwrap();
        let run = |plan: &Arc<TypedRunnableModel>| {
            let y = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
            super::super::patch::plain_slice::<f32>(&y[0])
                .unwrap()
                .to_vec()
        };
        (n, run(&given), run(&ours))
    }

    fn cases() -> impl Strategy<Value = Case> {
        (
            // Past 64 channels: every block width of the channel-last
            // layout (64, 32, 16 and the leftovers one by one).
            (2usize..120, 1usize..14, 1usize..14),
            (1usize..6, 1usize..6, 1usize..4, 1usize..4),
            (
                1usize..3,
                1usize..3,
                [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            ),
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |((c, h, w), (kh, kw, sh, sw), (dh, dw, pads), (bias, nhwc, steps))| Case {
                    channels: c,
                    group: c,
                    hw: [h, w],
                    kernel: [kh, kw],
                    strides: [sh, sw],
                    dilations: [dh, dw],
                    pads,
                    bias,
                    nhwc,
                    steps,
                },
            )
            .prop_filter("an output at least 1×1", |c| {
                (0..2).all(|a| {
                    c.hw[a] + c.pads[a] + c.pads[a + 2] > c.dilations[a] * (c.kernel[a] - 1)
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn the_same_answers_as_tracts_depthwise(
            case in cases(),
            planes in any::<bool>(),
        ) {
            let layout = if planes { Layout::Planes } else { Layout::ChannelLast };
            let (n, given, ours) = both(&case, layout);
            prop_assert_eq!(n, 1);
            // Equal as numbers (a zero's sign aside), in tract's own order;
            // on other CPUs tract's own kernel rounds differently.
            if cfg!(target_arch = "x86_64") {
                prop_assert_eq!(given, ours, "{:?} {:?}", layout, case);
            } else {
                for (a, b) in given.iter().zip(&ours) {
                    prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{} vs {} {:?}", a, b, case);
                }
            }
        }
    }

    #[test]
    fn grouped_convolutions_stay_tracts_and_each_layer_gets_its_layout() {
        let base = Case {
            channels: 32,
            group: 32,
            hw: [8, 8],
            kernel: [3, 3],
            strides: [2, 2],
            dilations: [1, 1],
            pads: [1, 1, 1, 1],
            bias: true,
            nhwc: false,
            steps: false,
        };
        for layout in [Layout::ChannelLast, Layout::Planes] {
            let (n, given, ours) = both(&base, layout);
            assert_eq!((n, given == ours), (1, true), "{layout:?}");
        }
        let grouped = Case {
            group: 8,
            ..base.clone()
        };
        assert_eq!(both(&grouped, Layout::Planes).0, 0);

        let chosen = |case: &Case| {
            let typed = decluttered(case);
            let conv = typed.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap();
            DepthwiseConv::of(&typed, conv).unwrap().unwrap().choose()
        };
        let with = |change: &dyn Fn(&mut Case)| {
            let mut case = base.clone();
            change(&mut case);
            case
        };
        let narrow = |c: &mut Case| {
            c.channels = 8;
            c.group = 8;
        };
        let rule = [
            (with(&|_| {}), Some(Layout::ChannelLast), "strided, small"),
            (with(&narrow), None, "8 channels, strided"),
            (
                with(&|c| {
                    narrow(c);
                    c.strides = [1, 1];
                }),
                Some(Layout::Planes),
                "8 channels, stride 1",
            ),
            (
                with(&|c| {
                    c.strides = [1, 1];
                    c.hw = [6, 6];
                }),
                Some(Layout::ChannelLast),
                "6 outputs a row",
            ),
            (
                with(&|c| {
                    c.strides = [1, 1];
                    c.hw = [8, 12];
                }),
                Some(Layout::Planes),
                "12 outputs a row",
            ),
            (
                with(&|c| c.hw = [80, 80]),
                None,
                "6400 points a plane, strided",
            ),
            (
                with(&|c| {
                    c.strides = [1, 1];
                    c.hw = [80, 80];
                }),
                None,
                "6400 points a plane",
            ),
            (
                with(&|c| {
                    c.strides = [1, 1];
                    c.hw = [40, 40];
                }),
                Some(Layout::Planes),
                "1600 points, stride 1",
            ),
            (
                with(&|c| {
                    c.hw = [80, 80];
                    c.nhwc = true;
                }),
                Some(Layout::ChannelLast),
                "channel-last data: no copies",
            ),
            (
                with(&|c| {
                    narrow(c);
                    c.strides = [1, 1];
                    c.nhwc = true;
                }),
                Some(Layout::Planes),
                "8 channels, channel-last data",
            ),
        ];
        for (case, wanted, why) in &rule {
            assert_eq!(chosen(case), *wanted, "{why}");
        }
    }

    #[test]
    fn a_kernel_with_a_non_finite_tap_stays_tracts() {
        let case = Case {
            channels: 16,
            group: 16,
            hw: [6, 6],
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [1, 1, 1, 1],
            bias: false,
            nhwc: false,
            steps: false,
        };
        let mut proto = model(&case);
        let graph = proto.graph.as_mut().unwrap();
        graph.initializer[0].float_data[4] = f32::INFINITY;
        let typed = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap();
        let conv = typed.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap();
        assert!(DepthwiseConv::of(&typed, conv).unwrap().is_none());
        let mut same = typed.clone();
        assert_eq!(
            substitute_where(&mut same, |_| Some(Layout::Planes)).unwrap(),
            0
        );
    }

    /// A pointwise, depthwise, pointwise block over a `[1, C, H, W]` graph
    /// input, with a batch normalisation left after the depthwise layer (a
    /// per-channel Mul and Add, as in UltraFace): the depthwise layer is
    /// channel-first as tract declutters it.
    fn block(channels: usize, hw: [usize; 2], strides: [usize; 2]) -> ModelProto {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut weights = |name: &str, dims: &[usize]| {
            let data = (0..dims.iter().product()).map(|_| rng.f32() - 0.5);
            test_graphs::float_tensor(name, dims, data.collect())
        };
        let c = channels;
        let initializer = vec![
            weights("w1", &[c, c, 1, 1]),
            weights("b1", &[c]),
            weights("wd", &[c, 1, 3, 3]),
            weights("bd", &[c]),
            weights("scale", &[c, 1, 1]),
            weights("shift", &[c, 1, 1]),
            weights("w2", &[c, c, 1, 1]),
        ];
        let node = test_graphs::node;
        let depthwise = vec![
            AttributeProto {
                name: "group".into(),
                r#type: AttributeType::Int as i32,
                i: c as i64,
                ..Default::default()
            },
            ints("kernel_shape", &[3, 3]),
            ints("strides", &strides),
            ints("pads", &[1, 1, 1, 1]),
        ];
        test_graphs::model(
            "block",
            vec![
                node("Conv", &["x", "w1", "b1"], "p1", vec![]),
                node("Relu", &["p1"], "r1", vec![]),
                node("Conv", &["r1", "wd", "bd"], "d", depthwise),
                node("Mul", &["d", "scale"], "ds", vec![]),
                node("Add", &["ds", "shift"], "dt", vec![]),
                node("Relu", &["dt"], "r2", vec![]),
                node("Conv", &["r2", "w2"], "y", vec![]),
            ],
            initializer,
            vec![test_graphs::float_value("x", &[1, c, hw[0], hw[1]])],
            vec![test_graphs::untyped_value("y")],
        )
    }

    #[test]
    fn a_depthwise_layer_between_pointwise_ones_runs_channel_last_without_copies() {
        let layers = |model: &TypedModel| -> Vec<(bool, Option<Layout>)> {
            model
                .nodes()
                .iter()
                .filter_map(|n| DepthwiseConv::of(model, n).unwrap())
                .map(|op| (op.channels_last_data, op.choose()))
                .collect()
        };
        let c = 16;
        let run = |model: TypedModel, x: &Tensor| {
            let plan = model.into_optimized().unwrap().into_runnable().unwrap();
            let y = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
            super::super::patch::plain_slice::<f32>(&y[0])
                .unwrap()
                .to_vec()
        };
        // (plane side, strides, moved, the layout before the move)
        let cases = [
            (12, [2, 2], true, Some(Layout::ChannelLast)),
            (12, [1, 1], false, Some(Layout::Planes)),
            // Too large a plane for the copies, not with none.
            (72, [2, 2], true, None),
        ];
        for (hw, strides, moved, layout) in cases {
            let x: Vec<f32> = {
                let mut rng = fastrand::Rng::with_seed(3);
                (0..c * hw * hw).map(|_| rng.f32() * 4.0 - 2.0).collect()
            };
            let x = Tensor::from_shape(&[1, c, hw, hw], &x).unwrap();
            let typed = tract_onnx::onnx()
                .model_for_proto_model(&block(c, [hw, hw], strides))
                .unwrap()
                .into_typed()
                .unwrap()
                .into_decluttered()
                .unwrap();
            let before = layers(&typed);
            let mut ours = typed.clone();
            let n = to_channel_last(&mut ours).unwrap();
            let after = layers(&ours);
            if before[0].0 {
                // tract's AArch64 build moves a depthwise layer's channels
                // last itself while decluttering (for its channel-inner
                // kernel): nothing is left to move.
                assert_ne!(std::env::consts::ARCH, "x86_64", "{hw} {strides:?}");
                assert_eq!((n, &after), (0, &before), "{hw} {strides:?}");
            } else if moved {
                assert_eq!(n, 1, "{hw} {strides:?}");
                assert_eq!(before, [(false, layout)], "{hw} {strides:?}");
                // Channel-last with no copies.
                assert_eq!(after, [(true, Some(Layout::ChannelLast))]);
            } else {
                // Planes on channel-first data: nothing to gain by moving.
                assert_eq!((n, &before), (0, &[(false, layout)].to_vec()));
                assert_eq!(after, before);
            }
            assert_eq!(
                substitute_where(&mut ours, DepthwiseConv::choose).unwrap(),
                1
            );
            // The Mul and Add after the layer are the op's now, on either
            // layout.
            assert_eq!(absorb_steps(&mut ours).unwrap(), 2, "{hw} {strides:?}");
            let binary = |m: &TypedModel| {
                m.nodes()
                    .iter()
                    .filter(|n| n.op_is::<tract_onnx::tract_core::ops::binary::TypedBinOp>())
                    .count()
            };
            assert_eq!(binary(&ours) + 2, binary(&typed), "{hw} {strides:?}");
            let (given, ours) = (run(typed, &x), run(ours, &x));
            assert_eq!(given.len(), c * (hw / strides[0]).pow(2));
            // As in the property test: tract's AArch64 kernel rounds
            // differently.
            if cfg!(target_arch = "x86_64") {
                assert_eq!(given, ours, "{strides:?}");
            } else {
                for (a, b) in given.iter().zip(&ours) {
                    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }
}
